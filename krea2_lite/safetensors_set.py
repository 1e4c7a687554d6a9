"""Validation of a set of safetensors files read as one checkpoint.

What this guards against (all silent before): the same tensor in two files (whichever file was
read last won), an index whose `weight_map` was ignored, a header whose byte range disagrees with
its shape and dtype (a relabelled dtype reads garbage), and integer or bool tensors where the model
holds floats (they were cast and used).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import ArgumentError, ArgumentTypeError, CheckpointNotFoundError, SafetensorsSetError
from .jsonfile import get_typed, read_json

# Bytes per element of every dtype name the safetensors format defines.
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
              "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_entry(path: Path, key: str, dtype: str, shape, start: int, end: int) -> None:
    """A header entry's byte range must hold exactly prod(shape) elements of `dtype`."""
    if dtype not in ITEM_BYTES:
        raise SafetensorsSetError(f"{path}: tensor '{key}' has unknown dtype {dtype!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SafetensorsSetError(f"{path}: tensor '{key}' has an invalid shape {list(shape)}")
    want = math.prod(shape) * ITEM_BYTES[dtype]
    if end - start != want:
        raise SafetensorsSetError(
            f"{path}: tensor '{key}' is {dtype} {list(shape)} = {want} bytes, but its header gives it "
            f"{end - start} bytes; the header was edited or the file is damaged")


def read_weight_map(index: Path) -> dict[str, str]:
    """{tensor key: shard file name} from a `*.safetensors.index.json`, every entry checked."""
    data = read_json(index, required=("weight_map",), what="shard index")
    weight_map = get_typed(data, "weight_map", dict, where=str(index), default={})
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise SafetensorsSetError(f"{index}: weight_map['{key}'] must be a file name in the same folder, "
                                      f"got {name!r}")
    return weight_map


def require_float(entries: dict[str, tuple[Path, object]], names=None) -> None:
    """Refuse integer / bool tensors among `names` (default: all) of a {key: (file, ..., TensorInfo)} map (`loading.files.tensor_locations`)."""
    for key in (entries if names is None else names):
        file, info = entries[key][0], entries[key][-1]
        if info.dtype not in FLOAT_NAMES:
            raise SafetensorsSetError(
                f"{file}: tensor '{key}' is stored as {info.dtype}, but the model expects floating point "
                f"({'/'.join(FLOAT_NAMES)}); the file is not a float checkpoint of this model")


def check_float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """`dtype=` arguments are compute dtypes: float32, bfloat16, float16 (float64 for tests)."""
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(f"{name} must be a torch floating dtype ({', '.join(map(str, FLOAT_DTYPES))}), "
                                f"got {dtype!r}")
    if dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"{name} must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype}; quantized "
                            "weights are asked for with quant=, not dtype=")
    return dtype
