"""The driver of a batch job: what is left to do, Ray Data to do it, the manifest as results arrive.

Retry policy (stated in docs/ray.md): each worker actor is restarted up to MAX_RESTARTS times when
its process dies, and a job (one prompt-file line) whose worker died is resubmitted up to
MAX_TASK_RETRIES times; an exception raised by the pipeline is not retried (it would fail again)
and fails the run — the manifest keeps every image finished before it, so a re-run resumes.
Exactly once: the driver records each index once (a retried job's repeated records are ignored),
and a job's PNGs are rewritten whole (same bytes) if Ray runs it twice.
"""

from __future__ import annotations

import json
import time
import warnings

from pathlib import Path

from ..errors import UnsafeOutputError
from .jobs import plan_images
from .manifest import MANIFEST, read_manifest, still_valid, write_manifest
from .progress import JobProgress
from .storage import Storage

MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
MANIFEST_EVERY_S = 2.0  # the manifest is rewritten at most this often (and at the end)


def run_batch(jobs: list[dict], load: dict, output: str, *, stem: str, workers: int = 1,
              gpus_per_worker: float | None = None, address: str | None = "auto", options: dict | None = None,
              metadata: bool = True, progress: bool = True, inputs: tuple = ()) -> dict:
    """Generate every image of `jobs` not already in `output`; returns {"total", "skipped", "generated",
    "manifest"}. `load`: model, variant, dtype, quant, lora [(path, scale)], text_encoder, vae;
    `options`: from_pretrained's offload, vram_gb, host_ram_gb, device for each worker; `inputs`: local
    files (the prompt file) the job must never overwrite."""
    storage = Storage(output)
    planned = plan_images(jobs, load, stem, metadata)
    _refuse_overwriting(storage, planned, inputs)
    storage.makedirs()
    old = read_manifest(storage)
    entries = {im["index"]: old[im["index"]] for p in planned for im in p["images"]
               if still_valid(storage, old.get(im["index"]), im)}
    pending = [p for p in planned if any(im["index"] not in entries for im in p["images"])]
    if entries != old:
        write_manifest(storage, entries)  # stale or damaged entries go now; an unchanged run touches nothing
    total = sum(len(p["images"]) for p in planned)
    summary = dict(total=total, skipped=len(entries), generated=0, manifest=storage.display("manifest.jsonl"))
    if not pending:
        return summary
    bar = JobProgress(total, len(entries), progress)
    try:
        last = time.monotonic()
        for records in _results(pending, load, storage, workers, gpus_per_worker, address, options or {}):
            fresh = [r for r in records if r["index"] not in entries]  # a retried job's repeats are dropped
            for record in fresh:
                entries[record["index"]] = record
            bar.update(len(fresh))
            summary["generated"] += len(fresh)
            if time.monotonic() - last >= MANIFEST_EVERY_S:
                write_manifest(storage, entries)
                last = time.monotonic()
    finally:
        write_manifest(storage, entries)
        bar.close()
    return summary


def _refuse_overwriting(storage: Storage, planned: list[dict], inputs) -> None:
    if storage.remote:
        return
    names = {MANIFEST} | {im["file"] for p in planned for im in p["images"]}
    for path in inputs:
        target = Path(path).resolve()
        if target.parent == Path(storage.path("x")).parent and target.name in names:
            raise UnsafeOutputError(f"--output {storage.location}: the job would overwrite its input {path}")


def _results(pending, load, storage, workers, gpus_per_worker, address, options):
    """Each finished job's records, in the order jobs finish."""
    import ray

    from .worker import GenerateJobs

    connect(address)
    gpus = gpus_per_worker if gpus_per_worker is not None else (1 if ray.cluster_resources().get("GPU") else 0)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's own bar says done / total, rate and ETA
    context.execution_options.preserve_order = False
    dataset = ray.data.from_items([{"work": json.dumps(p)} for p in pending], override_num_blocks=len(pending))
    # One job in flight per worker: a slow or restarted worker holds back no other job.
    pool = ray.data.ActorPoolStrategy(size=max(1, min(workers, len(pending))), max_tasks_in_flight_per_actor=1)
    with warnings.catch_warnings():  # Ray 2.60 has no named parameter for the restart policy yet
        warnings.simplefilter("ignore", DeprecationWarning)
        results = dataset.map_batches(
            GenerateJobs, batch_size=1, compute=pool, num_gpus=gpus, num_cpus=1,
            fn_constructor_kwargs=dict(load=_load(load), options=options, storage=storage),
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
    for row in results.iter_rows():
        yield json.loads(row["records"])


def _load(load: dict) -> dict:
    from .jobs import load_key

    return load_key(load)


def connect(address: str | None) -> None:
    """`auto`/None: the running cluster (RAY_ADDRESS, or one `ray start` began on this machine), else a
    new local instance; `local`: always a new local instance; anything else: that cluster's address.
    A driver already connected (ray.init by the caller) stays connected."""
    import ray

    if ray.is_initialized():
        return
    if address in (None, "auto"):
        try:
            ray.init(address="auto", log_to_driver=False)
            return
        except ConnectionError:
            address = "local"
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
