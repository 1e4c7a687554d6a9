"""The latent side of images in: where a strength starts the schedule, the noised start, the
latent blending of inpainting, and the final composite with the input's pixels.

Flow matching: the latent at flow time σ is ``(1 − σ)·x0 + σ·noise``; the sampler integrates from
σ = 1 (noise) to 0 (image). `strength` s keeps the last ``int(steps·s)`` steps of the text-to-image
schedule (diffusers' rule: ``t_start = steps − int(steps·s)``), and starts there from the image's
latents noised with the SAME noise the seed draws for text to image. s = 1 starts at σ = 1, where
the start is the noise itself: the same latents, so the same pixels, as text to image.

Inpainting (the standard latent blending): after every step the kept region (mask 0) is replaced by
the input's latents noised to the step's new σ, so at σ = 0 it holds the input's own latents; the
decoded result is then composited with the input's pixels through the pixel mask, so every pixel
where the (blurred) mask is 0 is the input's exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ArgumentError
from .sampling import pack_latents


def cut_schedule(schedule: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of `schedule` (steps+1 times, 1 → 0) that `strength` keeps; ArgumentError if no step is left."""
    steps = len(schedule) - 1
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ArgumentError(f"strength={strength:g} with {steps} steps leaves no step to run (it keeps "
                            f"int(steps × strength) = {kept}); raise strength to ≥ {1 / steps:.4g} or steps")
    return schedule[steps - kept:]


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """(1 − σ)·x0 + σ·noise in float32 (σ = 1 returns the noise exactly)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return (1 - sigma) * x0.float() + sigma * noise.float()


def latent_mask(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) → latent mask (B, 1, H/scale, W/scale): a latent is repainted (1) when any
    pixel it covers is, so the composite's soft edge always lies over freshly sampled latents."""
    return (F.max_pool2d(mask, scale) > 0).float()


class LatentBlend:
    """The per-step hook of inpainting: kept latents ← the input's latents noised to the step's σ.

    Everything packed: x0, noise (B, L, C·p²) float32 and the mask broadcast to the same shape.
    """

    def __init__(self, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, schedule: torch.Tensor,
                 patch: int):
        channels = x0.shape[1]
        self.x0 = pack_latents(x0.float(), patch)
        self.noise = pack_latents(noise.float(), patch)
        self.repaint = pack_latents(mask.expand(x0.shape[0], channels, -1, -1).float(), patch)
        self.schedule = schedule.float().cpu()

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """After step i (the latents now at schedule[i + 1])."""
        device = x.device
        kept = noised(self.x0.to(device), self.noise.to(device), self.schedule[i + 1].to(device))
        m = self.repaint.to(device)
        return (m * x.float() + (1 - m) * kept).to(x.dtype)


def composite(images: list, original: torch.Tensor, mask: torch.Tensor) -> list:
    """PIL outputs blended with the input: out = m·generated + (1 − m)·input on 8-bit values; where
    m = 0 the input's bytes are copied (exact).  original (1|B, 3, H, W) on the 8-bit grid, mask (1|B, 1, H, W)."""
    from PIL import Image

    out = []
    for k, image in enumerate(images):
        gen = np.asarray(image, dtype=np.float32)
        orig = (original[min(k, original.shape[0] - 1)].permute(1, 2, 0).numpy() * 255).round()
        m = mask[min(k, mask.shape[0] - 1), 0].numpy()[:, :, None]
        blended = np.where(m > 0, (m * gen + (1 - m) * orig).round(), orig)
        out.append(Image.fromarray(blended.clip(0, 255).astype(np.uint8)))
    return out


def image_start(image_in, x0: torch.Tensor, noise: torch.Tensor, schedule: torch.Tensor, patch: int,
                dtype: torch.dtype):
    """(schedule tail, packed start latents in `dtype`, LatentBlend or None) for a call with an image.

    x0: the image's normalised latents (1|B, C, h, w) float32; noise: the call's noise (B, C, h, w).
    """
    schedule = cut_schedule(schedule, image_in.strength)
    x0 = x0.to(noise.device).expand(noise.shape[0], -1, -1, -1)
    start = pack_latents(noised(x0, noise, schedule[0].cpu()).to(noise.device), patch).to(dtype)
    blend = None
    if image_in.mask is not None:
        scale = image_in.pixels.shape[-1] // x0.shape[-1]
        mask = latent_mask(image_in.mask, scale).to(noise.device)
        blend = LatentBlend(x0, noise, mask, schedule, patch)
    return schedule, start, blend
