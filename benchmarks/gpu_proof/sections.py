"""The GPU proof's sections, in the order they run: one line each.

A section is a module with a function `run(ctx, rec, section)`: `ctx` holds the device, dtype, model
shape (ctx.cfg), resolution, text tokens, warm-up and repeat counts, a temporary folder (ctx.tmp) and
the parsed arguments (ctx.args); `rec` records rows (`rec.check(name, fn)`, `rec.timing(**row)`,
`rec.skip_check(name, why)`); `section` is its share of --budget-s (`section.left()` seconds,
`section.fits(s)`, `section.why_not(s)` for a row that would not fit: record "not measured: …" or
"skipped: …" instead of running past it). An exception ends that section only. `weight` is the
section's share of the budget; time a section leaves unused rolls over to the later ones.

To add a section: write `benchmarks/gpu_proof/<name>.py` with `run(ctx, rec, section)` and add one
line below (before `quanto`, which stays last: it may spend its time building quanto's extension).
Import triton only inside functions: the runner selects the Triton interpreter for a CPU dry run after
it has parsed its arguments, and triton reads that choice when it is first imported.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from benchmarks.gpu_proof import correctness, layers, quanto, timings


class ProofSection(NamedTuple):
    name: str
    weight: float
    run: Callable
    needs_peer: bool = False  # skipped under --no-peer or without diffusers


SECTIONS = (
    ProofSection("checks", 0.24, correctness.run),
    ProofSection("layers", 0.08, layers.layer_rows),
    ProofSection("steps", 0.38, timings.step_rows),
    ProofSection("stream", 0.15, timings.stream_rows),
    ProofSection("quanto", 0.15, quanto.run, needs_peer=True),
)
