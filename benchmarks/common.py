"""What every benchmark shares: the model presets, the one timing helper, and how results are written.

Timing (PITFALLS: CPU timings here are bimodal, medians of 3 mean nothing): `time_ms` synchronizes, runs
`warmup` untimed calls, then times each call — with a pair of CUDA events on a GPU, `time.perf_counter`
on the CPU — and returns every sample in milliseconds; `alternate` interleaves several systems repeat by
repeat so that a slow phase of the machine hits them all; `summary` gives the minimum (the figure to
compare on a noisy CPU) and the median of the samples.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from krea2_lite import Krea2Config

# Transformer shapes by name: the released 12.9B model, a ~43M model with the real structure, a toy.
PRESETS = {"tiny": Krea2Config.tiny(), "medium": Krea2Config.medium(), "full": Krea2Config.krea2()}
DEFAULT_RESOLUTION = {"tiny": 64, "medium": 256, "full": 1024}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def model_dtype(device: torch.device) -> torch.dtype:
    """CPU runs in float32 (bf16 matmuls are emulated and slow there), CUDA in bfloat16."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(fn: Callable[[], object], device: torch.device | str) -> float:
    """Milliseconds of one call, the device's queued work included."""
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def time_ms(fn: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 0) -> list[float]:
    """`warmup` untimed calls, then `repeats` timed ones: every sample in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [time_one(fn, device) for _ in range(repeats)]


def alternate(systems: dict[str, Callable[[], object]], device: torch.device | str, repeats: int,
              warmup: int = 0) -> dict[str, list[float]]:
    """Each system warmed up, then timed once per repeat in turn: {name: [ms per repeat]}."""
    for fn in systems.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, fn in systems.items():
            times[name].append(time_one(fn, device))
    return times


def summary(times: list[float]) -> dict[str, float]:
    """{"min_ms", "median_ms"} of a list of samples."""
    return {"min_ms": round(min(times), 3), "median_ms": round(statistics.median(times), 3)}


def markdown_table(header: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """A Markdown table; `align` is one character per column, "l" or "r" (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    body = [header, *[[str(c) for c in row] for row in rows]]
    lines = ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join([lines[0], "|" + "|".join(rule) + "|", *lines[1:]])


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))
