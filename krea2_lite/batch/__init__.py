"""Batch generation on Ray Data: `krea2_lite.batch.generate(prompts, output, model=…, workers=…)`.

One Krea2Pipeline per worker (built once), one prompt-file line per task, PNGs with their metadata
and a `manifest.jsonl` in `output` (a folder or a pyarrow.fs URI). Resumable and exactly once; see
run.py for the retry policy and docs/ray.md for clusters and memory.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import checks
from .jobs import jobs_from_file
from .run import run_batch

__all__ = ["generate", "run_batch"]


def generate(prompts: str | os.PathLike, output: str | os.PathLike, *, model: str, quant=None,
             variant: str | None = None, dtype: str | None = None, loras=(), workers: int = 1,
             gpus_per_worker: float | None = None, address: str | None = "auto", negative_prompt: str | None = None,
             seed: int = 0, steps: int | None = None, guidance: float | None = None, mu: float | None = None,
             width: int | None = None, height: int | None = None, num_images: int = 1, metadata: bool = True,
             offload: str = "auto", vram_gb: float | None = None, host_ram_gb: float | None = None,
             text_encoder: str | None = None, vae: str | None = None, progress: bool = True) -> dict:
    """Every image of the prompt file (.txt / .jsonl, the `generate --prompts` rules; line i's image is
    the one the single-process run writes for it) into `output` as `{stem}_{index:04d}.png` plus
    `manifest.jsonl`. Images already there (entry and file matching) are skipped. Returns
    {"total", "skipped", "generated", "manifest"}. `dtype`: bf16 | fp16 | fp32 (default bf16; fp32 for
    the demo); `loras`: [(path, scale)]; `gpus_per_worker` defaults to 1 when the cluster has GPUs."""
    defaults = dict(negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance, mu=mu, width=width,
                    height=height, num_images=num_images)
    if dtype not in (None, "bf16", "fp16", "fp32"):
        raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
    checks.check_int("workers", workers, 1, 4096)
    jobs = jobs_from_file(str(prompts), defaults)
    load = dict(model=str(model), variant=variant, quant=None if quant == "none" else quant,
                dtype=dtype or ("fp32" if str(model) == "demo" else "bf16"), lora=list(loras),
                text_encoder=text_encoder, vae=vae)
    options = dict(offload=offload, vram_gb=vram_gb, host_ram_gb=host_ram_gb)
    return run_batch(jobs, load, str(output), stem=Path(str(prompts)).stem, workers=workers,
                     gpus_per_worker=gpus_per_worker, address=address, options=options, metadata=metadata,
                     progress=progress, inputs=(str(prompts),))
