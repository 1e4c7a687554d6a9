"""The one dtype table: every dtype name the safetensors format defines, its torch dtype and its
size, and the float dtypes a model computes in.

Readers (`safetensors_headers`), the shard writer and the loaders all take their names, sizes and
torch dtypes from here.
"""

from __future__ import annotations

import torch

from ..errors import ArgumentError, ArgumentTypeError

# name → (torch dtype, bytes per element); None where krea2_lite reads no tensor of that type.
TABLE: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1), "F8_E8M0": (None, 1),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U64": (None, 8), "U32": (None, 4), "U16": (None, 2), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
ITEM_BYTES = {name: size for name, (_, size) in TABLE.items()}
SAFETENSORS_DTYPES = {name: dtype for name, (dtype, _) in TABLE.items() if dtype is not None}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# The compute dtypes `dtype=` arguments accept (float64 for tests).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """`dtype=` arguments are compute dtypes: float32, bfloat16, float16 (float64 for tests)."""
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(f"{name} must be a torch floating dtype ({', '.join(map(str, FLOAT_DTYPES))}), "
                                f"got {dtype!r}")
    if dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"{name} must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype}; quantized "
                            "weights are asked for with quant=, not dtype=")
    return dtype
