"""A step cache's memory across the steps of one generation: when to skip, and what to add instead.

The decision (First-Block-Cache): after the first F blocks, compare their output residual
r = x_F − x_0 with the one of the last fully computed step, relative L1
  d = mean|r − r_ref| / mean|r_ref|;
skip the later blocks when d < threshold, unless the step is forced (one of the first `warmup` or
last `tail` steps, or `max_skip` steps were just skipped). r_ref is only renewed on computed steps,
so small changes cannot add up unnoticed over a run of skipped steps.

What a skipped step adds to x_F: the residual R = x_L − x_F of the later blocks, either the last
computed one (order 0, plain reuse) or the value at this step's flow time t of the polynomial
through the last order+1 computed (t, R) pairs (Lagrange form; "taylor": calibration-free, the
TaylorSeer idea with divided differences in t rather than in step index, since the schedule is not
uniform).

CFG: cond and uncond are one batch and share the decision (one pass over the blocks; a streamed
block is copied once for both halves). `per_half=True` also records each half's d (benchmarks).
"""

from __future__ import annotations

from collections import deque

import torch

from ..errors import ArgumentError
from .spec import CacheSpec


class CacheState:
    """Decision, stored residuals and counters for one transformer over one generation."""

    def __init__(self, spec: CacheSpec, layers: int, *, per_half: bool = False):
        if spec.first >= layers:
            raise ArgumentError(f"cache first={spec.first} must be below the model's {layers} blocks")
        self.spec, self.layers, self.per_half = spec, layers, per_half
        self.begin(None)

    def begin(self, steps: int | None) -> None:
        """A new generation of `steps` steps (None: unknown, no tail rule): forget everything."""
        self.steps = steps
        self.step = 0
        self.run = 0  # steps skipped in a row
        self.reference = None  # r_ref: first-blocks residual of the last computed step
        self.history: deque = deque(maxlen=self.spec.order + 1)  # (t, R) of the last computed steps
        self.evaluated = 0  # block evaluations that ran
        self.total = 0  # block evaluations an uncached run makes
        self.skips: list[bool] = []
        self.distances: list[float | None] = []
        self.half_distances: list[tuple[float, ...]] = []

    # ---- decision -----------------------------------------------------------------------------
    def _forced(self) -> bool:
        spec = self.spec
        late = self.steps is not None and self.step >= self.steps - spec.tail
        return self.reference is None or self.step < spec.warmup or late or self.run >= spec.max_skip

    def decide(self, first_residual: torch.Tensor) -> bool:
        """True: skip the later blocks this step. Reads one number back from the device."""
        distance = None
        if self.reference is not None and self.reference.shape == first_residual.shape:
            distance = relative_l1(first_residual, self.reference)
            if self.per_half and first_residual.shape[0] % 2 == 0:
                self.half_distances.append(tuple(relative_l1(a, b) for a, b in
                                                 zip(first_residual.chunk(2), self.reference.chunk(2))))
        elif self.reference is not None:  # a new shape (another call's batch): nothing to reuse
            self.reference = None
            self.history.clear()
        skip = distance is not None and not self._forced() and distance < self.spec.threshold
        self.distances.append(distance)
        self.skips.append(skip)
        return skip

    # ---- residuals ----------------------------------------------------------------------------
    def predict(self, t: float) -> torch.Tensor:
        """The later blocks' residual at flow time t from the stored ones (see the module docstring)."""
        points = list(self.history)
        if len(points) == 1 or self.spec.order == 0:
            return points[-1][1]
        times = [p[0] for p in points]
        out = None
        for k, (tk, residual) in enumerate(points):
            weight = 1.0
            for j, tj in enumerate(times):
                if j != k:
                    weight *= (t - tj) / (tk - tj)
            term = residual.float() * weight
            out = term if out is None else out.add_(term)
        return out.to(points[-1][1].dtype)

    def computed(self, t: float, first_residual: torch.Tensor, residual: torch.Tensor) -> None:
        """A fully computed step: renew the reference and remember (t, R)."""
        if self.history and self.history[-1][0] == t:  # the same t twice (a repeated call): keep one
            self.history.pop()
        self.reference = first_residual
        self.history.append((t, residual))
        self.run = 0
        self.evaluated += self.layers
        self.total += self.layers
        self.step += 1

    def skipped(self) -> None:
        self.run += 1
        self.evaluated += self.spec.first
        self.total += self.layers
        self.step += 1

    @property
    def saved(self) -> float:
        """Share of block evaluations not run (0 before any step)."""
        return 1 - self.evaluated / self.total if self.total else 0.0

    @property
    def nbytes(self) -> int:
        """Device bytes the cache holds now (reference plus stored residuals)."""
        tensors = ([self.reference] if self.reference is not None else []) + [r for _, r in self.history]
        return sum(t.numel() * t.element_size() for t in tensors)


def device_bytes(spec: CacheSpec, rows: int, tokens: int, features: int, itemsize: int) -> int:
    """Upper bound of what a cache adds on the device for `rows` batch rows of `tokens` tokens (text +
    image) × `features`: r_ref, the stored residuals, this step's first-blocks residual, and for a
    predictor its float32 sum (4 bytes per value)."""
    one = rows * tokens * features
    stored = 1 + (spec.order + 1) + 1
    return one * itemsize * stored + (one * 4 if spec.order > 0 else 0)


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """mean|now − before| / mean|before| in float32 (0 when both are zero)."""
    diff = (now.float() - before.float()).abs().mean()
    base = before.float().abs().mean().clamp_min(torch.finfo(torch.float32).tiny)
    return float(diff / base)  # one read-back from the device
