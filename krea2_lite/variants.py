"""Sampling defaults of the two released variants (Raw: 52 steps with CFG; Turbo: 8 steps, distilled)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantDefaults:
    steps: int
    guidance: float
    mu: float | None  # None: from the image-token count


VARIANTS = {
    "raw": VariantDefaults(steps=52, guidance=3.5, mu=None),
    "turbo": VariantDefaults(steps=8, guidance=0.0, mu=1.15),
}
