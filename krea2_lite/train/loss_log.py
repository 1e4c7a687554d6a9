"""The loss curve: one JSON line per step beside the output, and a PNG drawn with PIL (no matplotlib)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..files.leftovers import partial_name


def log_paths(output: Path) -> tuple[Path, Path]:
    stem = Path(output).with_suffix("")
    return stem.with_name(stem.name + ".loss.jsonl"), stem.with_name(stem.name + ".loss.png")


def _rows(path: Path) -> list[dict]:
    """The well-formed rows ({"step": int, "loss": number, ...}) of a loss log; any other line (the half
    line a killed run leaves, a hand edit) is dropped: the log is ours and only drawn, never trusted."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n") if path.is_file() else []:
        try:
            row = json.loads(line) if line.strip() and len(line) < 4096 else None
        except (ValueError, RecursionError):
            row = None
        if (isinstance(row, dict) and type(row.get("step")) is int
                and isinstance(row.get("loss"), (int, float)) and not isinstance(row.get("loss"), bool)):
            rows.append(row)
    return rows


def truncate(path: Path, last_step: int) -> None:
    """Drop lines after `last_step` (a resumed run rewrites the steps after its checkpoint)."""
    if not path.is_file():
        return
    rows = [row for row in _rows(path) if row["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def append(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def draw(jsonl: Path, png: Path, size: tuple[int, int] = (640, 360)) -> None:
    """Raw loss in grey, its moving average in blue; y from 0 to the 99th percentile."""
    from PIL import Image, ImageDraw

    rows = [r for r in _rows(jsonl) if math.isfinite(r["loss"])]
    image = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(image)
    left, top, right, bottom = 50, 20, size[0] - 10, size[1] - 30
    pen.rectangle((left, top, right, bottom), outline="black")
    if rows:
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        high = sorted(losses)[int(0.99 * (len(losses) - 1))] or 1.0
        span = max(steps[-1] - steps[0], 1)

        def xy(step, loss):
            return (left + (right - left) * (step - steps[0]) / span,
                    bottom - (bottom - top) * min(loss, high) / high)

        pen.line([xy(s, v) for s, v in zip(steps, losses)], fill=(170, 170, 170))
        smooth, average = [], losses[0]
        for v in losses:
            average = 0.9 * average + 0.1 * v
            smooth.append(average)
        pen.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
        pen.text((left, bottom + 8), f"step {steps[0]} … {steps[-1]}   loss 0 … {high:.3g}", fill="black")
    tmp = png.with_name(partial_name(png.name))
    image.save(tmp, format="PNG")
    os.replace(tmp, png)
