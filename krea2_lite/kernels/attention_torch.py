"""Plain-torch attention: the reference every attention kernel is compared with, and the fallback."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads and an optional key-padding mask.

    q: (B, H, L, D); k, v: (B, Hkv, L, D) with H a multiple of Hkv (query head h reads KV head
    h // (H/Hkv)); key_mask: (B, L) bool, True = attend. Returns (B, H, L, D) in q's dtype.
    The mask is passed as (B, 1, 1, L) — broadcast over heads and queries, never an L×L tensor.
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
