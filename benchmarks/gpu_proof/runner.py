"""The GPU proof's runner: arguments, the result header, the time budget over the sections (sections.py),
the watchdog. The package docstring (benchmarks/gpu_proof/__init__.py) says what the proof measures.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.gpu_proof.context import preset_config
from benchmarks.gpu_proof.sections import SECTIONS

WATCHDOG_GRACE_S = 90.0  # past the budget a stuck run writes what it has and exits


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the proof) or cpu (a dry run; use --preset tiny)")
    ap.add_argument("--preset", choices=["tiny", "medium", "full"], help="model shape (default: full on cuda, "
                    "tiny on cpu)")
    ap.add_argument("--json", type=Path, help="result file (the Markdown table goes beside it as .md)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run (default 420)")
    ap.add_argument("--resolution", type=int, help="pixels per side (default 1024; tiny 64)")
    ap.add_argument("--text-tokens", type=int, help="compacted text tokens per step (default 64; tiny 8)")
    ap.add_argument("--warmup", type=int, help="untimed calls per system, where compilation happens (default 1; "
                    "tiny 0)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; tiny on the CPU: 1)")
    ap.add_argument("--repeats", type=int, help="timed calls per row (default 3; tiny 1)")
    ap.add_argument("--sections", default=",".join(s.name for s in SECTIONS), help="comma-separated subset to run")
    ap.add_argument("--no-peer", action="store_true", help="skip the diffusers and quanto peers")
    ap.add_argument("--isolate", choices=["auto", "on", "off"], default="auto",
                    help="run the checks in a child process restarted past a check that kills it (auto: on CUDA)")
    ap.add_argument("--only-checks", default="", help="comma-separated name prefixes: run only these checks")
    ap.add_argument("--skip-checks", default="", help=argparse.SUPPRESS)  # names a restarted child leaves out
    ap.add_argument("--write-table", nargs="?", type=Path, const=Path("default"), metavar="PATH",
                    help="write this GPU's measured auto choices into the tuning table")
    ap.add_argument("--table-from", type=Path, metavar="RESULT", help="fill the table from an earlier result; "
                    "runs nothing else")
    args = ap.parse_args(argv)
    if args.table_from is None and args.json is None:
        ap.error("--json OUT is required (unless --table-from)")
    names = [s.name for s in SECTIONS]
    unknown = set(args.sections.split(",")) - set(names)
    if unknown:
        ap.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(names)}")
    if args.budget_s <= 0:
        ap.error("--budget-s must be > 0")
    tiny = (args.preset or ("tiny" if args.device == "cpu" else "full")) == "tiny"
    args.preset = args.preset or ("tiny" if args.device == "cpu" else "full")
    args.resolution = args.resolution or (32 if tiny else 1024)
    args.text_tokens = args.text_tokens or (4 if tiny else 64)
    args.repeats = args.repeats or (1 if tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if tiny else 1)
    if args.threads is None and tiny and args.device == "cpu":
        args.threads = 1  # tiny models are all per-op overhead: one thread is faster and steadier
    return args


def header(args, device) -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - reported, not needed
        triton_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, capability, memory = props.name, list(torch.cuda.get_device_capability(device)), props.total_memory
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        capability, memory = None, None
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "capability": capability, "memory_gb": None if memory is None else round(memory / 1e9, 1),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "preset": args.preset, "budget_s": args.budget_s, "resolution": args.resolution,
            "text_tokens": args.text_tokens, "warmup": args.warmup, "repeats": args.repeats,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def make_ctx(args, device, tmp: Path) -> argparse.Namespace:
    import torch

    from benchmarks.gpu_proof.timings import Estimates

    with_peer = not args.no_peer
    if with_peer:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            with_peer = False
    ctx = argparse.Namespace(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                             tiny=args.preset == "tiny", preset=args.preset, cfg=preset_config(args.preset),
                             resolution=args.resolution, text_tokens=args.text_tokens, warmup=args.warmup,
                             repeats=args.repeats, tmp=tmp, with_peer=with_peer,
                             quanto_build_dir=tmp / "quanto_build", args=args)
    ctx.estimates = Estimates(ctx)
    return ctx


def run_section(budget, rec, name: str, fn, *args) -> None:
    from benchmarks.gpu_proof.record import describe

    section = budget.open(name)
    allotted = section.left()
    note = ""
    print(f"\n== {name}: {allotted:.0f} s ==", flush=True)
    try:
        fn(*args, section)
    except Exception as exc:  # noqa: BLE001 - a broken section must not take the later ones down
        note = f"section aborted: {describe(exc)}"
        print(note, flush=True)
    spent = time.monotonic() - section.started
    rec.section({"name": name, "allotted_s": round(allotted, 1), "spent_s": round(spent, 1), "note": note})


def start_watchdog(rec, budget) -> threading.Timer:
    def fire():
        from benchmarks.gpu_proof.quanto import CHILDREN, kill

        for child in CHILDREN:
            kill(child)
        rec.update(complete=False, killed=f"watchdog: still running {WATCHDOG_GRACE_S:.0f} s past the budget",
                   elapsed_s=round(budget.elapsed(), 1))
        print("gpu_proof: watchdog fired; results so far are in the JSON", file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(budget.total + WATCHDOG_GRACE_S, fire)
    timer.daemon = True
    timer.start()
    return timer


def write_table(result: dict, target: Path) -> str:
    from benchmarks.gpu_proof.layers import derive_entry

    from krea2_lite.kernels import tuning

    if not result.get("capability"):
        return "table not written: the result is not from a GPU"
    path = tuning.TABLE_PATH if str(target) == "default" else target
    entry = derive_entry(result)
    tuning.write_entry(path, result["device"], entry)
    return f"wrote the auto choices for {result['device']} into {path}"


def prove(args, device, rec, budget, tmp: Path) -> None:
    """Every selected section of the registry (sections.py) in order, each within its share of the budget."""
    from benchmarks.gpu_proof.quanto import Prewarm, kill

    ctx = make_ctx(args, device, tmp)
    ctx.prewarm = Prewarm(ctx) if device.type == "cuda" and ctx.with_peer and "quanto" in budget.pending else None
    runs = {s.name: s for s in SECTIONS}
    try:
        for name in budget.pending[:]:
            if runs[name].needs_peer and not ctx.with_peer:
                budget.pending.remove(name)
                rec.section({"name": name, "note": "skipped: --no-peer or diffusers not installed"})
                continue
            run_section(budget, rec, name, runs[name].run, ctx, rec)
    finally:
        if ctx.prewarm is not None:
            kill(ctx.prewarm.proc)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # The Triton kernels run under the interpreter on the CPU; it is chosen when triton is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import json

    import torch

    if args.table_from is not None:
        from krea2_lite.errors import Krea2LiteError

        try:
            result = json.loads(args.table_from.read_text())
            print(write_table(result, args.write_table or Path("default")))
        except (OSError, ValueError, KeyError, Krea2LiteError) as exc:
            print(f"error: {args.table_from}: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda needs a CUDA GPU (use --device cpu --preset tiny for a dry run)")
        return 0
    from benchmarks.gpu_proof.record import Budget, Recorder
    from benchmarks.gpu_proof.report import add_ratios, goals, markdown

    wanted = args.sections.split(",")
    budget = Budget(args.budget_s, {s.name: s.weight for s in SECTIONS if s.name in wanted})
    rec = Recorder(args.json, header(args, device), markdown)
    watchdog = start_watchdog(rec, budget)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_proof_"))
    try:
        prove(args, device, rec, budget, tmp)
    finally:
        watchdog.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        add_ratios(rec.data["timings"])
        rec.update(goals=goals(rec.data["timings"]), elapsed_s=round(budget.elapsed(), 1), complete=True)
    if args.write_table is not None:
        print(write_table(rec.data, args.write_table))
    checks = rec.data["checks"]
    failed = [c["name"] for c in checks if not c["ok"] and not c.get("skipped")]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks ok; {len(rec.data['timings'])} timing rows; "
          f"{budget.elapsed():.0f} s of {args.budget_s:.0f}; wrote {args.json} and {rec.md_path}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
