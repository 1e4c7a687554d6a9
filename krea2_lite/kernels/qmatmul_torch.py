"""Plain-torch quantized matmul: the reference every quantized-matmul kernel is checked against.

The weight is dequantized exactly like `QuantizedLinear.dequantize` (fp32 arithmetic, then a
cast to the activation dtype) and multiplied with `F.linear`. Layouts (w = (out, in) weight):
  int8  qdata int8 (out, in),          w = qdata · scale,       scale (out, 1)
  fp8   qdata float8_e4m3fn (out, in), w = qdata · scale,       scale (out, 1)
  int4  qdata uint8 (ceil(G/2), g),    w = q · scale − shift,   scale/shift (G, 1), G = out·in/g;
        q[r] = qdata[r] & 0xF for r < ceil(G/2), q[r + ceil(G/2)] = qdata[r] >> 4 (row-major groups).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantize_weight(qdata: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, dtype: str,
                      out_features: int, in_features: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight the stored values represent (fp32 math, then `out_dtype`)."""
    if dtype == "int4":
        rows = scale.shape[0]
        q = torch.cat([qdata & 0xF, qdata >> 4])[:rows].float()
        w = q * scale.float() - shift.float()
    elif dtype in ("int8", "fp8"):
        w = qdata.float() * scale.float()
    else:
        raise ValueError(f"unknown quantized dtype {dtype!r}")
    return w.reshape(out_features, in_features).to(out_dtype)


def qmatmul_torch(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                  dtype: str, group: int | None, out_features: int, in_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Wᵀ + bias with W dequantized to x.dtype. x (..., in_features) → (..., out_features)."""
    w = dequantize_weight(qdata, scale, shift, dtype, out_features, in_features, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def qmatmul_scratch(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, dtype: str, out_features: int,
                    in_features: int, bias: torch.Tensor | None, buffer: torch.Tensor) -> torch.Tensor:
    """`qmatmul_torch` for int8 / fp8 with the weight dequantized into `buffer` (≥ out·in elements of
    x.dtype, reused across layers) instead of a fresh fp32 product and its cast.

    Bit-identical to `qmatmul_torch` when `scale` is stored in x.dtype (how krea2_lite loads it):
    int8 and e4m3 values are exact in bf16/fp16/fp32, so copy_ then mul_ rounds the product once, as
    the reference's fp32 product and cast do.
    """
    if dtype not in ("int8", "fp8"):
        raise ValueError(f"qmatmul_scratch handles int8 / fp8, not {dtype!r}")
    w = buffer.view(-1)[: out_features * in_features].view(out_features, in_features)
    w.copy_(qdata)
    w.mul_(scale)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
