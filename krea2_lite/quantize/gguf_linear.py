"""A linear layer whose weight stays in a GGUF file's quantized blocks; and the stored-format record
that lets the planner count such a model's bytes.

`GGUFLinear` holds the stored bytes as the buffer `qdata` (uint8, (out, row bytes): one row of
blocks per output feature, exactly as the file stores it, memory-mapped on the CPU) and dequantizes
them one layer at a time when called (`kernels.gguf_linear`). Like `QuantizedLinear` it is
recognised by the rest of the library by its `qdata` / `in_features` / `out_features`: LoRA hooks
sit beside it, the planner counts its stored bytes, block streaming moves them.

`StoredFormat` describes what a community file stores per linear (its GGUF type, or None for a
float layer); it is hashable so the planner's size cache can key on it, and `skeleton` builds the
meta model the loader fills — the planner counts on that same skeleton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import kernels
from ..config import Krea2Config
from ..files.gguf_container import BLOCK_TYPES
from ..kernels.gguf_dequant_torch import dequantize_gguf
from ..model import Krea2Transformer
from .scaled_linear import swap_comfy_linears


class GGUFLinear(nn.Module):
    """y = x·Wᵀ + b with W stored as GGUF blocks of `qtype` (Q8_0, Q4_K, …)."""

    stores_quantized = True  # the planner counts its buffers as stored

    def __init__(self, in_features: int, out_features: int, bias: bool, qtype: str,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        block, size = BLOCK_TYPES[qtype]
        if in_features % block:
            raise ValueError(f"{qtype} needs in_features divisible by {block}, got {in_features}")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("qdata", torch.empty((out_features, in_features // block * size), dtype=torch.uint8,
                                                  device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the stored blocks represent, on their device."""
        return dequantize_gguf(self.qdata, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return kernels.gguf_linear(x, self.qdata, self.qtype, self.out_features, self.in_features, bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qtype}, bias={self.bias is not None}"


def swap_gguf_linears(model: nn.Module, types: dict[str, str], compute_dtype: torch.dtype) -> None:
    """Replace the named nn.Linear modules by empty (meta) GGUFLinear ones of the given types."""
    for name, qtype in types.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, leaf)
        setattr(owner, leaf, GGUFLinear(linear.in_features, linear.out_features, linear.bias is not None, qtype,
                                        compute_dtype, device="meta"))


@dataclass(frozen=True)
class StoredFormat:
    """A transformer loaded as a community file stores it: `format` "gguf" (`linears`: (module, GGUF
    type) pairs) or "comfy" ((module, kind, block rows, block cols), see `scaled_linear`), and a short
    `name` for messages. Quacks like a
    QuantSpec where the planner asks (`lowrank`, `activations`, `dtype`)."""

    format: str
    linears: tuple[tuple[str, str], ...]
    name: str
    lowrank: int = 0
    activations: None = None

    @property
    def dtype(self) -> str:
        return self.name

    def skeleton(self, config: Krea2Config, dtype: torch.dtype) -> Krea2Transformer:
        """The meta-device model the loader fills (GGUF linears swapped in; float tensors not cast)."""
        with torch.device("meta"):
            model = Krea2Transformer(config)
        if self.format == "gguf":
            swap_gguf_linears(model, dict(self.linears), dtype)
        else:  # "comfy": (name, kind, block rows, block cols) per quantized layer
            swap_comfy_linears(model, self.linears, dtype)
        model.stored_format = self
        return model


# Dequantized at load even when the file stores it in blocks: the input projection sets the model's
# activation dtype (`Krea2Transformer.compute_dtype`) and is tiny.
DEQUANTIZED_AT_LOAD = ("first",)


def gguf_format(types: dict[str, str], model: nn.Module) -> StoredFormat:
    """The StoredFormat of a GGUF file whose official tensor names have the ggml `types`: every
    nn.Linear of `model` whose weight is stored in a block type stays quantized (but `first`)."""
    linears = {name: types[name + ".weight"] for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name not in DEQUANTIZED_AT_LOAD
               and types.get(name + ".weight") not in (None, "F32", "F16", "BF16")}
    counts: dict[str, int] = {}
    for qtype in linears.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    name = "gguf " + "/".join(sorted(counts, key=lambda t: -counts[t])) if counts else "gguf float"
    return StoredFormat("gguf", tuple(sorted(linears.items())), name)
