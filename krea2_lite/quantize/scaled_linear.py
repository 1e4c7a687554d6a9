"""ComfyUI quantized layers in this library's modules.

A float8_e4m3fn or int8 layer with one scale per tensor or per row is exactly this library's
`QuantizedLinear` ("fp8" / "int8": w = qdata · scale, scale (out, 1)), so it takes the existing
fp8 / int8 paths (weight-only dequant, W8A8 kernels). Every other supported layout — float8_e5m2,
int8 with block scales — becomes a `ScaledLinear`: the stored values and their float32 block scales
kept as stored, dequantized one layer at a time when called.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qlinear import QuantizedLinear

STORED_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8}


class ScaledLinear(nn.Module):
    """y = x·Wᵀ + b, W = qdata · scale per (block_rows × block_cols) block, scale float32
    (out / block_rows, in / block_cols)."""

    stores_quantized = True  # the planner counts its buffers as stored

    def __init__(self, in_features: int, out_features: int, bias: bool, storage: str, block: tuple[int, int],
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        rows, cols = block
        if out_features % rows or in_features % cols:
            raise ValueError(f"block {block} does not divide the ({out_features}, {in_features}) weight")
        self.in_features, self.out_features, self.block = in_features, out_features, (rows, cols)
        self.register_buffer("qdata", torch.empty((out_features, in_features), dtype=STORED_DTYPES[storage],
                                                  device=device))
        self.register_buffer("scale", torch.empty((out_features // rows, in_features // cols), dtype=torch.float32,
                                                  device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.block
        a, b = self.scale.shape
        w = self.qdata.float().reshape(a, rows, b, cols) * self.scale.reshape(a, 1, b, 1)
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.qdata.dtype}, block={self.block}, "
                f"bias={self.bias is not None}")


def comfy_module(linear: nn.Linear, kind: str, block: tuple[int, int], compute_dtype: torch.dtype) -> nn.Module:
    """The empty (meta) module for one ComfyUI layer: `kind` "fp8" / "int8" (a QuantizedLinear with
    per-row scales) or a stored dtype name (a ScaledLinear with `block`)."""
    if kind in ("fp8", "int8"):
        return QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, kind, None,
                               compute_dtype, device="meta")
    return ScaledLinear(linear.in_features, linear.out_features, linear.bias is not None, kind, block, compute_dtype,
                        device="meta")


def swap_comfy_linears(model: nn.Module, layers: tuple, compute_dtype: torch.dtype) -> None:
    """Replace each (name, kind, rows, cols) of `layers` by its empty ComfyUI module."""
    for name, kind, rows, cols in layers:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, comfy_module(getattr(owner, leaf), kind, (rows, cols), compute_dtype))


def set_comfy_weight(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Fill `module` from the stored weight and its float32 scale (already checked and reshaped to
    the module's block grid: (out, 1) for a QuantizedLinear)."""
    if isinstance(module, QuantizedLinear):
        if weight.dtype == torch.float8_e5m2:  # cannot happen: e5m2 layers are ScaledLinear
            raise ValueError("float8_e5m2 is not a QuantizedLinear storage")
        module.qdata = weight.contiguous()
        module.scale = scale.to(module.scale.dtype).reshape(-1, 1).expand(module.out_features, 1).contiguous()
    else:
        module.qdata = weight.contiguous()
        module.scale = scale.float().reshape(module.scale.shape).contiguous()
