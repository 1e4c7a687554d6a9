"""Krea 2's flow-matching objective, as the official trainer writes it
(krea-ai/krea-2 `src/krea2/training/objectives.py`: `flow_matching_loss`, `shifted_random_times`).

Convention (the sampler's, `krea2_lite.sampling`): t = 1 is noise, t = 0 the image;
x_t = t·noise + (1 − t)·x, and the model predicts v = dx_t/dt = noise − x, which the sampler
integrates from 1 to 0 with x ← x + (t_next − t)·v. Times: u uniform in (1e-5, 1 − 1e-5), shifted
as the sampler shifts its schedule, t = e^μ / (e^μ + (1/u − 1)), with μ the resolution shift of
this image-token count (`sampling.resolution_mu`, the scheduler's own settings) plus the official
trainer's `high_noise_shift` 0.5 (biases training toward noisier states). Loss: mean squared error
in float32 over every latent value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..sampling import pack_latents, positions, resolution_mu

HIGH_NOISE_SHIFT = 0.5


def sample_times(batch: int, image_tokens: int, generator: torch.Generator, shift: dict,
                 high_noise_shift: float = HIGH_NOISE_SHIFT) -> torch.Tensor:
    mu = resolution_mu(image_tokens, **shift) + high_noise_shift
    u = torch.rand(batch, generator=generator, dtype=torch.float32).clamp_(1e-5, 1.0 - 1e-5)
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


def pad_text(texts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L, layers, dim) zero-padded text states and their (B, L) mask (None when all full)."""
    length = max(t.shape[0] for t in texts)
    context = texts[0].new_zeros(len(texts), length, *texts[0].shape[1:])
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for i, t in enumerate(texts):
        context[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return context, (None if bool(mask.all()) else mask)


def flow_loss(model, latents: torch.Tensor, texts: list[torch.Tensor], generator: torch.Generator,
              shift: dict, device: torch.device) -> torch.Tensor:
    """Float32 MSE between the predicted and the target velocity for one batch of one bucket.

    Noise and times come from `generator` (CPU, so a seeded run draws the same on any device)."""
    batch, _, h, w = latents.shape
    patch = model.config.patch
    rows, cols = h // patch, w // patch
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    t = sample_times(batch, rows * cols, generator, shift)
    tv = t.view(-1, 1, 1, 1)
    noisy = tv * noise + (1.0 - tv) * latents
    target = pack_latents(noise - latents, patch).to(device)
    context, mask = pad_text(texts)
    pos = positions(context.shape[1], rows, cols, device=device)
    dtype = model.compute_dtype
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = model(pack_latents(noisy, patch).to(device, dtype), context.to(device, dtype), t.to(device, dtype), pos,
                     None if mask is None else mask.to(device))
    return F.mse_loss(pred.float(), target.float())
