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

from benchmarks.gpu_proof import correctness, layers, quanto, ray_batch, step_cache, timings, training, vae_rows


class ProofSection(NamedTuple):
    name: str
    weight: float
    run: Callable
    needs_peer: bool = False  # skipped under --no-peer or without diffusers


SECTIONS = (
    ProofSection("checks", 0.24, correctness.run),
    ProofSection("layers", 0.08, layers.layer_rows),
    ProofSection("steps", 0.28, timings.step_rows),
    ProofSection("stream", 0.13, timings.stream_rows),
    ProofSection("ray", 0.05, ray_batch.run),  # a Ray Data batch worker on the GPU (issue 30)
    ProofSection("cache", 0.08, step_cache.run),  # step caching (issue 27)
    ProofSection("vae", 0.03, vae_rows.vae_rows),  # the VAE encoder of images in, beside a 1024² decode (issue 24)
    ProofSection("training", 0.04, training.run),  # LoRA training steps (issue 26)
    ProofSection("quanto", 0.15, quanto.run, needs_peer=True),
)
