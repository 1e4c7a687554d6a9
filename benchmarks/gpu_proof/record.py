"""The GPU proof's bookkeeping: the time budget, the result record (JSON + Markdown, rewritten
atomically after every row so a killed run still leaves its results) and the goal summary."""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

TIMING_KEYS = ("case", "system", "quant", "ms")


def describe(exc: BaseException) -> str:
    """One line naming the exception and where it was raised (the last frame inside this repository)."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "krea2_lite" in f.filename
              or "benchmarks" in f.filename]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {first}{where}"


class Section:
    """A named part of the run with its own deadline (time.monotonic())."""

    def __init__(self, name: str, deadline: float, budget: "Budget"):
        self.name, self.deadline, self.budget = name, deadline, budget
        self.started = time.monotonic()

    def left(self) -> float:
        return min(self.deadline, self.budget.deadline) - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left()

    def why_not(self, seconds: float) -> str:
        return (f"skipped: would exceed the '{self.name}' section's deadline (needs ~{seconds:.0f} s, "
                f"{max(0.0, self.left()):.0f} s left of a {self.budget.total:.0f} s budget)")


class Budget:
    """--budget-s split over the sections by weight; time a section leaves unused rolls over to the later ones."""

    def __init__(self, total_s: float, weights: dict[str, float]):
        self.total = float(total_s)
        self.start = time.monotonic()
        self.deadline = self.start + self.total
        self.weights = dict(weights)
        self.pending = list(weights)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def open(self, name: str) -> Section:
        later = sum(self.weights[n] for n in self.pending)
        share = self.weights[name] / later if later else 1.0
        self.pending.remove(name)
        left = max(0.0, self.deadline - time.monotonic())
        return Section(name, time.monotonic() + left * share, self)


class Recorder:
    """The result: {"device", "torch", "checks": [...], "timings": [...], ...}, rewritten after every entry."""

    def __init__(self, path: Path, header: dict, markdown: Callable[[dict], str]):
        self.path = Path(path)
        self.md_path = self.path.with_suffix(".md")
        self.markdown = markdown
        self.lock = threading.RLock()
        self.data = {**header, "checks": [], "timings": [], "goals": [], "sections": [], "complete": False}
        self.flush()

    def check(self, name: str, fn: Callable[[], tuple[bool, str]], cleanup: Callable[[], None] | None = None) -> bool:
        """Run one correctness check; an exception (OOM, compile error, ...) is a failed check, not a crash."""
        started = time.perf_counter()
        skipped = False
        try:
            result = fn()
            ok, detail = result[0], result[1]
            skipped = len(result) > 2 and bool(result[2])
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and the run carries on
            ok, detail = False, describe(exc)
        finally:
            if cleanup is not None:
                cleanup()
        entry = {"name": name, "ok": bool(ok), "detail": str(detail), "s": round(time.perf_counter() - started, 2)}
        if skipped:
            entry["skipped"] = True
        self.add("checks", entry)
        print(f"[check] {name}: {'ok' if ok else ('SKIPPED' if skipped else 'FAILED')} — {detail}", flush=True)
        return bool(ok)

    def skip_check(self, name: str, reason: str) -> None:
        self.add("checks", {"name": name, "ok": False, "detail": reason, "skipped": True, "s": 0.0})
        print(f"[check] {name}: SKIPPED — {reason}", flush=True)

    def timing(self, **row) -> dict:
        """A timing row; `ms` None means not measured (then `detail` says why)."""
        row = {key: row.pop(key, None) for key in TIMING_KEYS} | row
        row.setdefault("ok", row["ms"] is not None)
        row.setdefault("detail", "")
        self.add("timings", row)
        ms = "–" if row["ms"] is None else f"{row['ms']:.2f} ms"
        print(f"[time] {row['case']} · {row['system']} · {row['quant']} · {row.get('backend', '')}: {ms} "
              f"{row['detail']}", flush=True)
        return row

    def section(self, entry: dict) -> None:
        self.add("sections", entry)

    def add(self, key: str, entry: dict) -> None:
        with self.lock:
            self.data[key].append(entry)
            self.flush()

    def update(self, **fields) -> None:
        with self.lock:
            self.data.update(fields)
            self.flush()

    def flush(self) -> None:
        """Write the JSON and the Markdown beside it, each to a temporary name, then renamed into place."""
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for path, text in ((self.path, json.dumps(self.data, indent=1, default=str)),
                               (self.md_path, self.markdown(self.data))):
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(text + "\n")
                os.replace(tmp, path)
