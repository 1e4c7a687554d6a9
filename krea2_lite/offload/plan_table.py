"""The "which machine runs what" table of docs/memory-and-offload.md, from `plan_memory` (pure arithmetic).

Cards of 8 / 12 / 16 / 24 GiB × 16 / 32 GiB of host RAM (`host_ram_gb`) × transformer weights in
bf16 / fp8 / int8 / int4, for the released shape at 1024² with CFG (Raw), one image, Qwen3-VL-4B in
bf16, prefetch 1. Each cell is the plan in a few words, or which limit refuses it and by how much.
tests/docs/test_plan_table.py checks that the doc holds exactly what this prints today.

  python -m krea2_lite.offload.plan_table                                    # print the table
  python -m krea2_lite.offload.plan_table --write docs/memory-and-offload.md  # replace it between its markers
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from krea2_lite.config import Krea2Config
from krea2_lite.errors import MemoryPlanError
from krea2_lite.offload.planner import GiB, plan_memory

CARDS = (8, 12, 16, 24)
RAMS = (16, 32)
WEIGHTS = (None, "fp8", "int8", "int4")
START, END = "<!-- plan_table: start (python -m krea2_lite.offload.plan_table) -->", "<!-- plan_table: end -->"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def describe(plan) -> str:
    """A plan in a few words."""
    text = {"device": "", "swap": "TE swaps in", "cpu": "TE on CPU",
            "reload": f"TE re-read ({_gib(plan.text_reload_bytes)} GiB/call)"}[plan.text_encoder]
    if plan.transformer_leaves_for_encoding:
        text += ", DiT steps out"
    if plan.mode == "none":
        where = "all on card"
    elif not plan.streamed_blocks:
        where = "28/28 blocks on card"
    else:
        where = f"{len(plan.resident_blocks)} on card, {len(plan.streamed_blocks)} streamed"
    return f"{where}; {text}" if text else where


def cell(quant, card: int, ram: int) -> str:
    try:
        plan = plan_memory(Krea2Config.krea2(), quant, card, 1024, 1024, host_ram_gb=ram)
    except MemoryPlanError as exc:
        return refusal(exc)
    return f"{describe(plan)} · {_gib(plan.peak_bytes)} / {_gib(plan.host_bytes)} GiB"


def refusal(exc: MemoryPlanError) -> str:
    """Why not: the limit that binds and the least each budget would need (the planner's closest plans)."""
    card, ram = _gib(exc.closest_on_device.peak_bytes), _gib(exc.closest_on_host.host_bytes)
    if exc.limit == "device":
        return f"no: card (needs {card})"
    if exc.limit == "host":
        return f"no: RAM (needs {ram})"
    return f"no: card + RAM ({card} card at this RAM, or {ram} RAM at this card)"


def render() -> str:
    head = "| card | RAM | " + " | ".join("bf16" if q is None else q for q in WEIGHTS) + " |"
    rows = [head, "|---|---|" + "---|" * len(WEIGHTS)]
    for card in CARDS:
        for ram in RAMS:
            rows.append(f"| {card} GiB | {ram} GiB | " + " | ".join(cell(q, card, ram) for q in WEIGHTS) + " |")
    return "\n".join(rows)


def replace_between_markers(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"the markers {START!r} and {END!r} are not in the file")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table}\n{END}{after}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="a Markdown file whose table (between the markers) to replace")
    args = parser.parse_args()
    table = render()
    if args.write is None:
        print(table)
        return 0
    text = replace_between_markers(args.write.read_text(encoding="utf-8"), table)
    fd, tmp = tempfile.mkstemp(prefix=f".{args.write.name}.", dir=args.write.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, args.write)
    print(f"wrote the table into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
