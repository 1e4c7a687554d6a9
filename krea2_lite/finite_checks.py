"""Finite checks after each stage of a generation, each naming the stage's likely cause.

Sampling checks its latents step by step (`sampling.denoise`); this module covers the other
stages: the schedule (from `mu` and the scheduler's shift settings) before sampling, and the
pixels after decoding, so a NaN/inf never becomes a silent black PNG.
"""

from __future__ import annotations

import math

import torch

from .errors import NonFiniteError


def check_schedule(schedule: torch.Tensor, mu: float, shift: dict) -> None:
    """The flow times must be finite and run from 1 down to 0."""
    if not math.isfinite(mu):
        raise NonFiniteError(f"the timestep shift mu={mu} is not finite (from mu= or the scheduler's shift "
                             f"settings {shift})")
    if not torch.isfinite(schedule).all() or bool((schedule[1:] > schedule[:-1]).any()):
        raise NonFiniteError(f"the sampling schedule for mu={mu:.4g} is not a finite decreasing sequence "
                             f"(mu= or the scheduler's shift settings {shift} are out of range)")


def first_nonfinite_tensor(module: torch.nn.Module) -> str | None:
    """Name of the first parameter or buffer holding NaN/inf, or None."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def check_decoded(pixels: torch.Tensor, latents: torch.Tensor, vae) -> None:
    """The decoded images must be finite; otherwise say whether the latents, the VAE's config
    statistics or one of its weights is to blame."""
    if torch.isfinite(pixels).all():
        return
    if not torch.isfinite(latents).all():
        raise NonFiniteError("the final latents hold NaN/inf (the transformer's output); the image would be black")
    config = getattr(vae, "config", None)
    for field in ("latents_mean", "latents_std"):
        values = getattr(config, field, ())
        if any(not math.isfinite(float(v)) for v in values):
            raise NonFiniteError(f"the VAE's config.json {field} holds NaN/inf; the decoded image would be black")
    bad = first_nonfinite_tensor(vae)
    if bad is not None:
        raise NonFiniteError(f"the VAE weight '{bad}' holds NaN/inf (a damaged vae/ checkpoint); the decoded image "
                             "would be black")
    raise NonFiniteError("the VAE decoded NaN/inf from finite latents (overflow in its dtype? try dtype=torch.float32)")
