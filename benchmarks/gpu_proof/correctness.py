"""The `checks` section: correctness of every device path against its CPU / torch reference.

The check families (pipeline_checks.py, kernel_checks.py) yield (name, function) pairs; each runs within
the section's deadline and is recorded ok / failed with a one-line detail. On CUDA they run in a child
process restarted past a check that kills it (isolate.py).
"""

from __future__ import annotations

import os

from benchmarks.gpu_proof.isolate import ABORT_ENV, run_isolated
from benchmarks.gpu_proof.kernel_checks import attention_checks, gguf_checks, qmatmul_checks, w8a8_checks
from benchmarks.gpu_proof.pipeline_checks import pipeline_checks
from benchmarks.gpu_proof.timings import free

FAMILIES = (pipeline_checks, qmatmul_checks, w8a8_checks, attention_checks, gguf_checks)


def selected(name: str, only: str, skip: str) -> bool:
    """--only-checks takes name prefixes; --skip-checks (what a restarted child leaves out) exact names."""
    prefixes = [p for p in only.split(",") if p]
    if prefixes and not any(name == p or name.startswith(p.rstrip("/") + "/") for p in prefixes):
        return False
    return name not in skip.split(",")


def run(ctx, rec, section) -> None:
    if ctx.args.isolate == "on" or (ctx.args.isolate == "auto" and ctx.device.type == "cuda"):
        return run_isolated(ctx.args, rec, section, ctx.tmp)
    for family in FAMILIES:
        for name, fn in family(ctx):
            if not selected(name, ctx.args.only_checks, ctx.args.skip_checks):
                continue
            if section.left() <= 0:
                rec.skip_check(name, section.why_not(1.0))
                continue
            rec.update(running=name)  # a parent that sees this process die knows which check killed it
            if os.environ.get(ABORT_ENV) == name:
                os._exit(134)
            rec.check(name, fn, cleanup=lambda: free(ctx))
    rec.update(running=None)
