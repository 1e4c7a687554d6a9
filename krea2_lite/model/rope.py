"""3-axis rotary position embedding on adjacent pairs (official krea-2 convention)."""

from __future__ import annotations

import torch


def rope_tables(pos: torch.Tensor, axes: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for positions `pos` (B, L, n_axes) or (L, n_axes).

    Axis i rotates `axes[i]` channels of every head. Frequencies and angles are computed in
    float64 (as the reference does) and returned as float32 (B, L, sum(axes)//2); a 2-D `pos`
    gives a batch dimension of 1.
    """
    if pos.ndim == 2:
        pos = pos.unsqueeze(0)
    if pos.ndim != 3 or pos.shape[-1] != len(axes):
        raise ValueError(f"pos must have shape (B, L, {len(axes)}) or (L, {len(axes)}), got {tuple(pos.shape)}")
    # float64 is unavailable on some backends (MPS); the angles are small integers times
    # frequencies, so float32 there is a documented approximation, not a silent change elsewhere.
    wide = torch.float64 if pos.device.type != "mps" else torch.float32
    angles = []
    for i, dim in enumerate(axes):
        exponent = torch.arange(0, dim, 2, dtype=wide, device=pos.device) / dim
        omega = 1.0 / (theta ** exponent)
        angles.append(pos[..., i].to(wide).unsqueeze(-1) * omega)
    angle = torch.cat(angles, dim=-1)
    return torch.cos(angle).float(), torch.sin(angle).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, H, L, D) by the angles of cos/sin (B, L, D/2).

    Computed in float32 and returned in x's dtype, like the reference.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = torch.stack((c * x0 - s * x1, s * x0 + c * x1), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
