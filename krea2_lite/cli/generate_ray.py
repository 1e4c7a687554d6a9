"""`generate --prompts FILE --output DIR --ray [auto|local|ADDRESS] [--workers N] [--gpus-per-worker G]`:
the generate command's flags for a Ray batch job, and the hand-over to `run_batch`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import checks


def add_ray_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--ray", nargs="?", const="auto", metavar="auto|local|ADDRESS",
                     help="run --prompts as a Ray Data job: auto (default) joins the running cluster or starts a "
                     "local one; local always starts one; ADDRESS joins that cluster (see docs/ray.md)")
    gen.add_argument("--workers", type=int, default=1, help="with --ray: pipelines working at once (default 1)")
    gen.add_argument("--gpus-per-worker", type=float, help="with --ray: GPUs each worker reserves (default 1 "
                     "when the cluster has GPUs, else 0; 0.5 puts two workers on one card: give --vram-gb too)")


def run_ray(args: argparse.Namespace, jobs: list[dict], load: dict) -> int:
    """The checked jobs as one Ray batch job; prints one summary line."""
    from ..batch.run import run_batch

    if not args.prompts or not args.output:
        raise ValueError("--ray needs --prompts FILE and --output DIR (a folder or a pyarrow.fs URI)")
    if "{" in args.output or args.output.lower().endswith(".png"):
        raise ValueError(f"--output {args.output!r}: with --ray it names a folder (files are {{stem}}_{{index:04d}}.png)")
    checks.check_int("--workers", args.workers, 1, 4096)
    if args.gpus_per_worker is not None:
        checks.check_number("--gpus-per-worker", args.gpus_per_worker, 0.0, 64.0)
    options = dict(offload=args.offload, vram_gb=args.vram_gb, host_ram_gb=args.ram_gb, device=args.device)
    load = dict(load, text_encoder=args.text_encoder, vae=args.vae)
    summary = run_batch(jobs, load, args.output, stem=Path(args.prompts).stem, workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, address=args.ray, options=options,
                        metadata=not args.no_metadata, progress=not args.quiet,
                        inputs=tuple(f for f in (args.prompts, args.from_png) if f))
    print(f"{summary['generated']} generated, {summary['skipped']} already done, {summary['total']} in all; "
          f"manifest: {summary['manifest']}", flush=True)
    return 0
