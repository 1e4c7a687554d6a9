"""Random weights shaped like trained ones, for measuring quantizers: the int4 rounding and int4-lr claims
(docs/quantization.md, benchmarks/RESULTS.md) are measured on these, by benchmarks/int4_lowrank.py and the
tests alike. Not used when running a model.
"""

from __future__ import annotations

import math

import torch


def structured_weight(out: int, inp: int, seed: int, *, energy: float = 2.0, decay: float = 1.0,
                      directions: int = 512, outliers: int = 4, gain: float = 10.0, sigma: float = 0.02
                      ) -> torch.Tensor:
    """An (out, in) float32 weight shaped like a trained one.

    W = Σ_k s_k·u_k·v_kᵀ + N, then `outliers` random input columns × `gain`:
      u_k, v_k   Gaussian directions (k < `directions`), s_k ∝ (k+1)^−decay (a power-law spectrum),
                 scaled so ‖Σ s_k u_k v_kᵀ‖² = energy·‖N‖² (the structured part carries
                 energy/(1+energy) of the weight before the outliers: 2/3 by default);
      N          i.i.d. Gaussian noise of std `sigma` (a full-rank floor no low-rank branch can take);
      outliers   whole input columns scaled by `gain` (the channels that inflate int4 groups).
    """
    g = torch.Generator().manual_seed(seed)
    k = min(directions, out, inp)
    s = (1 + torch.arange(k, dtype=torch.float32)) ** -decay
    s *= math.sqrt(energy) * sigma / float(s.square().sum().sqrt())  # E‖Σ s u vᵀ‖² = Σs²·out·in
    w = (torch.randn(out, k, generator=g) * s) @ torch.randn(k, inp, generator=g)
    w += torch.randn(out, inp, generator=g) * sigma
    w[:, torch.randperm(inp, generator=g)[:outliers]] *= gain
    return w
