"""Plain-torch reference (and fallback) for the fused Krea 2 attention: q/k RMSNorm, RoPE, GQA
attention with a key mask, sigmoid output gate — the unfused model path, op for op."""

from __future__ import annotations

import torch

from .attention_torch import attention_torch


def qk_norm_torch(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm over the last dim in fp32: x * rsqrt(mean(x²) + eps) * (1 + scale), cast back."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1 + scale.float())).to(x.dtype)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (2i, 2i+1) of x (B, L, H, D) with cos/sin (B or 1, L, D//2), in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    xe, xo = xf[..., 0], xf[..., 1]
    c = cos.float()[:, :, None, :]
    s = sin.float()[:, :, None, :]
    return torch.stack((c * xe - s * xo, s * xe + c * xo), dim=-1).flatten(-2).to(x.dtype)


def fused_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_scale: torch.Tensor, k_scale: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, gate: torch.Tensor,
                          key_mask: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Krea 2 block attention, unfused.

    q (B, L, H, D); k, v (B, L, Hkv, D) — any strides; q_scale, k_scale (D,) zero-centred
    RMSNorm scales; cos, sin (B or 1, L, D//2) fp32; gate (B, L, H*D) raw gate projection;
    key_mask (B, L) bool, True = attend. Returns (B, L, H*D) in q's dtype, heads concatenated
    head-major (column h*D + d).

    Query rows of a batch entry whose keys are all masked come out as zeros (SDPA alone would
    give NaN); the Triton kernel does the same.
    """
    B, L, H, D = q.shape
    qr = rope_torch(qk_norm_torch(q, q_scale, eps), cos, sin)
    kr = rope_torch(qk_norm_torch(k, k_scale, eps), cos, sin)
    o = attention_torch(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), key_mask)
    o = o.transpose(1, 2).reshape(B, L, H * D)
    out = o.float() * torch.sigmoid(gate.float())
    if key_mask is not None:
        out = out.masked_fill(~key_mask.any(dim=-1)[:, None, None], 0.0)
    return out.to(q.dtype)
