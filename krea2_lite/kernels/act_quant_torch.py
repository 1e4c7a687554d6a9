"""Plain-torch per-token dynamic activation quantizer (the reference for `act_quant_triton`).

x (M, K) → (q (M, K), scale (M, 1) fp32) with x ≈ q · scale, one symmetric scale per row (token):
  int8  scale = absmax / 127, q = round_half_even(x / scale) clamped to ±127, torch.int8
  fp8   scale = absmax / 448, q = (x / scale) clamped to ±448, cast (RTNE) to float8_e4m3fn
A row of zeros gets scale 1 (q = 0). Everything is fp32 arithmetic in this exact order, so the
Triton kernel can reproduce it bit for bit.

Optional block Hadamard rotation (`rotate` = block size b, K a multiple of b): each length-b slice
of a row is multiplied by H_b / √b, H_b the ±1 Sylvester Hadamard matrix. H_b / √b is symmetric
and orthonormal, so (x·H)(W·H)ᵀ = x·Wᵀ: a layer stores its weight rotated (W·H, quantized after the
rotation) and rotates activations here, before their absmax. Rotation spreads an outlier channel
over b channels, which shrinks the per-token scale for every other channel.

SwiGLU fusion (`up` given): the quantized activation is silu(x)·up, formed exactly as the model's
`SwiGLU` forms it (silu in x.dtype, then the product in x.dtype), so the fused Triton kernel can
read gate and up once and never write the product.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

ACT_QUANT_DTYPES = ("int8", "fp8")
QMAX = {"int8": 127.0, "fp8": 448.0}
ROTATE_SIZES = (16, 32, 64, 128, 256)


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, *, normalized: bool = True, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The (n, n) Sylvester Hadamard matrix: ±1 entries, or ±1/√n (orthonormal and symmetric)."""
    h = _sylvester(n)
    if normalized:
        h = h.double() / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


def rotate_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., K) · blockdiag(H_b/√b) in fp32 (fp64 stays fp64): every length-b slice of the last dim.

    Computed as (x · H_±1) · (1/√b), the same order as the Triton kernel (the ±1 products are exact).
    """
    K = x.shape[-1]
    if K % block:
        raise ValueError(f"rotation block {block} does not divide the last dim {K}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard_matrix(block, normalized=False, dtype=dt, device=x.device)
    y = (x.to(dt).reshape(*x.shape[:-1], K // block, block) @ h) * (1.0 / math.sqrt(block))
    return y.reshape(x.shape)


def round_half_even(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v)


def act_quant_torch(x: torch.Tensor, dtype: str = "int8", rotate: int = 0,
                    up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x (..., K) per row → (q (M, K), scale (M, 1) fp32), M = x.numel() // K.

    dtype "int8" → q torch.int8; "fp8" → q torch.float8_e4m3fn. rotate = Hadamard block size or 0.
    up (same shape as x): quantize silu(x)·up instead (the SwiGLU product).
    """
    if dtype not in ACT_QUANT_DTYPES:
        raise ValueError(f"activation quant dtype must be one of {ACT_QUANT_DTYPES}, got {dtype!r}")
    if up is not None:
        x = F.silu(x) * up
    K = x.shape[-1]
    v = x.reshape(-1, K).float()
    if rotate:
        v = rotate_blocks(v, rotate)
    qmax = QMAX[dtype]
    amax = v.abs().amax(dim=1, keepdim=True) if K else v.new_zeros(v.shape[0], 1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    v = (v / scale).clamp(-qmax, qmax)
    if dtype == "int8":
        q = round_half_even(v).to(torch.int8)
    else:
        q = v.to(torch.float8_e4m3fn)
    return q, scale


def act_dequant_torch(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q · scale in fp32 (still rotated if the quantizer rotated)."""
    return q.float() * scale
