"""Building blocks of the Krea 2 transformer, with the official parameter names."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: weight = 1 + scale, computed in float32, eps 1e-5."""

    def __init__(self, features: int, eps: float = 1e-5):
        super().__init__()
        self.features = features
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(features, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.scale.float() + 1.0
        return F.rms_norm(x.float(), (self.features,), weight=weight, eps=self.eps).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, headdim: int):
        super().__init__()
        self.qnorm = RMSNorm(headdim)
        self.knorm = RMSNorm(headdim)


class SwiGLU(nn.Module):
    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(features, hidden, bias=False)
        self.up = nn.Linear(features, hidden, bias=False)
        self.down = nn.Linear(hidden, features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """Grouped-query self-attention with q/k RMSNorm, optional RoPE and a sigmoid output gate."""

    def __init__(self, dim: int, heads: int, kvheads: int):
        super().__init__()
        self.heads, self.kvheads = heads, kvheads
        self.headdim = dim // heads
        self.wq = nn.Linear(dim, self.headdim * heads, bias=False)
        self.wk = nn.Linear(dim, self.headdim * kvheads, bias=False)
        self.wv = nn.Linear(dim, self.headdim * kvheads, bias=False)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.qknorm = QKNorm(self.headdim)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, dim); rope = (cos, sin) each (B|1, L, headdim/2) or None; key_mask (B, L) bool."""
        q, k, v, gate = self.project(x)
        if rope is not None:  # the transformer blocks: norm, RoPE, attention and gate in one kernel
            out = kernels.fused_attention(q, k, v, self.qknorm.qnorm.scale, self.qknorm.knorm.scale,
                                          *rope, gate, key_mask, self.qknorm.qnorm.eps)
            return self.wo(out)
        q = self.qknorm.qnorm(q).transpose(1, 2)
        k = self.qknorm.knorm(k).transpose(1, 2)
        out = kernels.attention(q, k, v.transpose(1, 2), key_mask).transpose(1, 2).flatten(2)
        return self.wo(out * torch.sigmoid(gate))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four input projections of x (B, L, dim): q (B, L, H, D), k and v (B, L, Hkv, D), gate (B, L, dim)."""
        q = self.wq(x).unflatten(-1, (self.heads, self.headdim))
        k = self.wk(x).unflatten(-1, (self.kvheads, self.headdim))
        v = self.wv(x).unflatten(-1, (self.kvheads, self.headdim))
        return q, k, v, self.gate(x)


def modulate(x_normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(1 + scale)·x + shift; scale and shift (B, 1, dim) already in x's dtype."""
    return (1 + scale) * x_normed + shift
