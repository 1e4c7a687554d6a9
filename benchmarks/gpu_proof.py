"""One command that proves the GPU path: every CUDA code path checked, then timed, within a time budget.

    python benchmarks/gpu_proof.py --device cuda --json OUT.json [--budget-s 420] [--write-table]
    python benchmarks/gpu_proof.py --device cpu --preset tiny --json /tmp/proof.json      # dry run (~1 min)
    python benchmarks/gpu_proof.py --table-from OUT.json [--write-table PATH]             # fill the auto table

Writes OUT.json — {"device", "torch", "checks": [{"name", "ok", "detail"}...], "timings": [{"case",
"system", "quant", "ms", ...}...], "goals", "sections", ...} — and OUT.md beside it, both rewritten
atomically after every row, so a run killed from outside still leaves everything measured so far.

Sections, in order, each with a deadline from --budget-s (weights below; time a section leaves unused
rolls over to the later ones). Whatever would not fit is recorded as skipped with the reason; an
exception (out of memory, a compile error) fails that one check or row and the run carries on.
  checks   correctness on the device vs the CPU/torch reference: pipeline streaming (prefetch 1, 2),
           model swapping, LoRA beside streaming, the OOM re-plan under a real memory cap, quantized
           folders written on the CPU loaded on the device; qmatmul int8/fp8/int4 (triton, auto);
           W8A8 int8/fp8 ± rotation (quantizer, _int_mm, _scaled_mm, Triton GEMM, whole layers);
           attention and fused attention (proof_pipeline_checks.py, proof_kernel_checks.py)
  layers   one MLP-sized layer per token count and per choice `auto` can make (proof_layers.py)
  steps    full-shape transformer step (12.9B, random weights, 1024², batch 1 and 2 = CFG) for bf16,
           int8, fp8, int4, int8-w8a8, int8-w8a8-rot, fp8-w8a8 × KREA2_LITE_KERNELS auto / triton, and
           diffusers' bf16 Krea2Transformer2DModel on the same weights (proof_timings.py)
  stream   streamed vs resident CFG steps under simulated 8 / 12 / 16 GB cards
           (torch.cuda.set_per_process_memory_fraction, reset afterwards) for int8, int4, bf16
  quanto   diffusers + optimum-quanto int8 / int4 / fp8, last, in a time-boxed child process; quanto's
           CUDA extension is built in the background from the start (proof_quanto.py)
Every timing row carries its ratio to the bf16 step of the same run; `goals` holds the issue's targets.

`--write-table [PATH]` (default: krea2_lite/kernels/tuning.json) puts this GPU's measured `auto` choices
into the table; on a lent machine whose files do not come back, run `--table-from OUT.json` afterwards
where the repository lives. GPUs the table does not name keep the safe defaults.
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

HERE = Path(__file__).resolve().parent
for path in (HERE.parent / "tests", HERE.parent, HERE):  # tests/factories.py is reused on purpose
    sys.path.insert(0, str(path))

SECTIONS = {"checks": 0.24, "layers": 0.08, "steps": 0.38, "stream": 0.15, "quanto": 0.15}
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
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
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
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
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


def preset_config(preset: str):
    """The model shape of a preset; the dry run's tiny model has one block (the Triton interpreter is slow)."""
    from transformer_step import PRESETS

    if preset == "tiny":
        from krea2_lite import Krea2Config

        return Krea2Config.tiny(layers=1)
    return PRESETS[preset]


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

    from proof_timings import Estimates

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


def selected(name: str, only: str, skip: str) -> bool:
    prefixes = [p for p in only.split(",") if p]
    if prefixes and not any(name == p or name.startswith(p.rstrip("/") + "/") for p in prefixes):
        return False
    return name not in skip.split(",")


def run_checks(ctx, rec, section) -> None:
    from proof_isolate import ABORT_ENV
    from proof_kernel_checks import attention_checks, gguf_checks, qmatmul_checks, w8a8_checks
    from proof_pipeline_checks import pipeline_checks
    from proof_timings import free

    if ctx.args.isolate == "on" or (ctx.args.isolate == "auto" and ctx.device.type == "cuda"):
        from proof_isolate import run_isolated

        return run_isolated(ctx.args, rec, section, ctx.tmp)
    for family in (pipeline_checks, qmatmul_checks, w8a8_checks, attention_checks, gguf_checks):
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


def run_section(budget, rec, name: str, fn, *args) -> None:
    from proof_record import describe

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
        from proof_quanto import CHILDREN, kill

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
    from proof_layers import derive_entry

    from krea2_lite.kernels import tuning

    if not result.get("capability"):
        return "table not written: the result is not from a GPU"
    path = tuning.TABLE_PATH if str(target) == "default" else target
    entry = derive_entry(result)
    tuning.write_entry(path, result["device"], entry)
    return f"wrote the auto choices for {result['device']} into {path}"


def prove(args, device, rec, budget, tmp: Path) -> None:
    from proof_layers import layer_rows
    from proof_quanto import Prewarm, quanto_rows
    from proof_timings import step_rows, stream_rows

    ctx = make_ctx(args, device, tmp)
    prewarm = Prewarm(ctx) if device.type == "cuda" and ctx.with_peer and "quanto" in budget.pending else None
    steps = {"checks": (run_checks,), "layers": (layer_rows,), "steps": (step_rows,), "stream": (stream_rows,),
             "quanto": (quanto_rows,)}
    try:
        for name in budget.pending[:]:
            if name == "quanto":
                if not ctx.with_peer:
                    rec.section({"name": name, "note": "skipped: --no-peer or diffusers not installed"})
                    continue
                run_section(budget, rec, name, lambda c, r, s: quanto_rows(c, r, s, prewarm), ctx, rec)
            else:
                run_section(budget, rec, name, steps[name][0], ctx, rec)
    finally:
        if prewarm is not None:
            from proof_quanto import kill

            kill(prewarm.proc)


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
    from proof_record import Budget, Recorder
    from proof_report import add_ratios, goals, markdown

    wanted = args.sections.split(",")
    budget = Budget(args.budget_s, {name: weight for name, weight in SECTIONS.items() if name in wanted})
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
