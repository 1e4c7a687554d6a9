"""Flow-matching sampling as plain functions: latent packing, positions, schedule, Euler, CFG.

Conventions (official krea-2 `sampling.py`, checked equal to diffusers' Krea2Pipeline when its
scheduler carries the official values):
  * t = 1 is noise, t = 0 the image; the model predicts v and x ← x + (t_next − t)·v.
  * the schedule shifts linspace(1, 0, steps+1) by t' = e^mu / (e^mu + (1/t − 1)).
  * classifier-free guidance: v = cond + g·(cond − uncond), enabled when g > 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# Official resolution-dependent shift: mu goes linearly from 0.5 at 256 image tokens (256²
# pixels) to 1.15 at 6400 tokens (1280²).
DEFAULT_SHIFT = dict(base_image_seq_len=256, max_image_seq_len=6400, base_shift=0.5, max_shift=1.15)


def pack_latents(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, C, H, W) → (B, (H/p)·(W/p), C·p²), tokens in row-major order of the patch grid."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent of spatial size (height, width)."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def positions(txt_len: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """(txt_len + rows·cols, 3) RoPE coordinates: text at (0,0,0), image token (r, c) at (0, r, c)."""
    pos = torch.zeros(txt_len + rows * cols, 3, device=device)
    pos[txt_len:, 1] = torch.arange(rows, device=device).repeat_interleave(cols).float()
    pos[txt_len:, 2] = torch.arange(cols, device=device).repeat(rows).float()
    return pos


def resolution_mu(image_tokens: int, base_image_seq_len: int = 256, max_image_seq_len: int = 6400,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu interpolated linearly in the image-token count (and extrapolated beyond the ends)."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_tokens * slope + (base_shift - slope * base_image_seq_len)


def sigmas(steps: int, mu: float) -> torch.Tensor:
    """steps+1 float32 flow times from 1 down to 0, shifted by mu.

    Evaluated in float32 numpy, the way diffusers' FlowMatchEulerDiscreteScheduler does, so the
    two schedules agree bit for bit; the final 0 is exact.
    """
    if steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    t = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return torch.cat([torch.from_numpy(np.asarray(shifted, dtype=np.float32)), torch.zeros(1)])


def euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """x + (t_next − t)·v in float32, returned in v's dtype (as diffusers does)."""
    return (x.float() + (t_next - t) * v.float()).to(v.dtype)


@dataclass
class TextBatch:
    """Encoded prompts ready for the transformer: context (B, L, layers, dim), mask (B, L) or None."""

    context: torch.Tensor
    mask: torch.Tensor | None


def compact_text(hidden: torch.Tensor, mask: torch.Tensor) -> TextBatch:
    """Drop padded text tokens: keep each prompt's real tokens in order, pad to the longest.

    Padded tokens are masked as keys and their outputs discarded, and all text tokens share the
    position (0,0,0), so removing them changes no real token's result; it only shortens the
    sequence. When every row is then full, the mask is None (dense attention kernels apply).
    """
    lengths = mask.sum(dim=1)
    longest = int(lengths.max())
    b = hidden.shape[0]
    keep = torch.arange(longest, device=mask.device)[None, :] < lengths[:, None]
    # Stable sort puts real tokens first in their original order.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :longest]
    gathered = torch.gather(hidden, 1, order[:, :, None, None].expand(-1, -1, *hidden.shape[2:]))
    gathered = gathered * keep[:, :, None, None].to(gathered.dtype)
    return TextBatch(gathered, None if bool(keep.all()) else keep)


def stack_text(a: TextBatch, b: TextBatch) -> TextBatch:
    """Concatenate two text batches along the batch, padding the shorter sequence with masked zeros."""
    length = max(a.context.shape[1], b.context.shape[1])

    def padded(tb: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        n, l = tb.context.shape[:2]
        mask = tb.mask if tb.mask is not None else torch.ones(n, l, dtype=torch.bool, device=tb.context.device)
        if l < length:
            pad = length - l
            ctx = torch.cat([tb.context, tb.context.new_zeros(n, pad, *tb.context.shape[2:])], dim=1)
            mask = torch.cat([mask, mask.new_zeros(n, pad)], dim=1)
            return ctx, mask
        return tb.context, mask

    ca, ma = padded(a)
    cb, mb = padded(b)
    mask = torch.cat([ma, mb])
    return TextBatch(torch.cat([ca, cb]), None if bool(mask.all()) else mask)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def denoise(model: VelocityFn, latents: torch.Tensor, text: TextBatch, schedule: torch.Tensor, *,
            guidance: float = 0.0, uncond: TextBatch | None = None, rows: int, cols: int,
            progress: Callable[[int], None] | None = None,
            check_finite: bool = True,
            after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Euler integration of the flow ODE along `schedule` (steps+1 times, 1 → 0).

    latents (B, Limg, C·p²) packed noise. With guidance > 0, cond and uncond run as ONE batched
    forward of 2B rows. The time passed to the model is cast to the latent dtype first, as both
    references do (at bf16 that rounding is part of the model's behaviour). `after_step(i, x)` may
    replace the latents after step i (inpainting's latent blending, krea2_lite.inpaint).
    """
    if guidance > 0 and uncond is None:
        raise ValueError("guidance > 0 needs the unconditional (negative prompt) text")
    both = stack_text(text, uncond) if guidance > 0 else text
    txt_len = both.context.shape[1]
    pos = positions(txt_len, rows, cols, device=latents.device)
    mask = None
    if both.mask is not None:
        mask = torch.cat([both.mask, both.mask.new_ones(both.mask.shape[0], latents.shape[1])], dim=1)
    schedule = schedule.to(latents.device)
    x = latents
    for i in range(len(schedule) - 1):
        t, t_next = schedule[i], schedule[i + 1]
        rows_in = torch.cat([x, x]) if guidance > 0 else x
        tt = t.expand(rows_in.shape[0]).to(x.dtype)
        v = model(rows_in, both.context, tt, pos, mask)
        if guidance > 0:
            cond, unc = v.chunk(2)
            v = cond + guidance * (cond - unc)
        x = euler_step(x, v, t, t_next)
        if after_step is not None:
            x = after_step(i, x)
        if check_finite and not torch.isfinite(x).all():
            raise FloatingPointError(f"latents became NaN/inf at step {i + 1} of {len(schedule) - 1} "
                                     f"(t={float(t):.4f}); the image would be black or noise")
        if progress is not None:
            progress(i)
    return x
