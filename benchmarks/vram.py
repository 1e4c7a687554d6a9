"""Peak memory per pipeline stage, krea2_lite beside diffusers, plus the quantizer's throughput.

Pipeline part. Each system (krea2_lite's Krea2Pipeline, diffusers' Krea2Pipeline — with --quant,
its transformer quantized by optimum-quanto at the same weight type, and a diffusers+torchao row when
torchao is installed; see speed.py, whose systems these are) runs in its OWN fresh subprocess (process-wide peaks would otherwise mix the two), on the same saved folder
(benchmarks/pipeline_factory.py), prompt, noise, steps and guidance as benchmarks/speed.py. The
child loads the pipeline, then makes ONE cold end-to-end call (no warm-up) whose component calls
are wrapped exactly as in speed.py, giving the stages load / encode / denoise / decode:
  CUDA: peak_gb = torch.cuda.max_memory_allocated() during the stage (peak reset at its start),
        reserved_gb = torch.cuda.memory_reserved() and allocated_gb = memory_allocated() after it.
  CPU:  peak_rss_gb = the process's peak RSS during the stage (VmHWM, reset at the stage start
        through /proc/self/clear_refs), rss_gb = RSS after it, process_peak_gb = the process's
        peak RSS so far (max of every VmHWM read; the reset lowers ru_maxrss too, so ru_maxrss is
        not used in the pipeline children). "imports" is the RSS after importing torch and the
        system's library, before loading. RSS counts memory-mapped weight pages once touched
        (krea2_lite keeps float CPU weights mapped copy-on-write).
  time_s is that single cold call's stage time (speed.py gives warmed-up medians).

Quantizer part (krea2_lite only; skip with --no-quantize). `python -m krea2_lite.quantize --model
<folder>/transformer --dtype Q --out ...` in a subprocess (Q = --quant, or int8 when --quant is
none): wall time, peak RSS of that process (os.wait4), throughput = source transformer bytes on
disk / wall time (the wall time includes the ~seconds of Python/torch start-up, which dominates
for the small presets), output size. Then the load time and peak memory of
`load_transformer(<quantized folder>)` and, for reference, of the float `<folder>/transformer`,
each in a fresh subprocess. int4 needs optimum-quanto's C++ extension: it is built/loaded once
before anything is timed.

  python -m benchmarks.vram --device cpu --preset tiny
  python -m benchmarks.vram --device cpu --preset medium --resolution 256 --steps 2 --json vram_medium.json
  python -m benchmarks.vram --device cuda --preset full --resolution 1024 --steps 2 --quant int8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from benchmarks.common import device_name, model_dtype, sync
from benchmarks.pipeline_factory import ensure_preset, folder_size, usable_device
from benchmarks.systems import (SEED, Ours, Peer, StageClock, TorchaoPeer, add_common_args, check_common_args,
                                peer_classes, peer_note, prewarm_quant, proc_status)

MARK = "@@VRAM_RESULT@@ "
CHILDREN = {cls.name: cls for cls in (Ours, Peer, TorchaoPeer)}
GB = 1e9


def maxrss_bytes(usage=None) -> int:
    usage = usage or resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ---- children ----------------------------------------------------------------------------------
def child_pipeline(args) -> dict:
    device = torch.device(args.device)
    cls = CHILDREN[args.child]
    import krea2_lite  # noqa: F401

    if cls is not Ours:
        import diffusers  # noqa: F401
    prewarm_quant(args.quant)  # int4: quanto's extension is built/loaded before anything is measured
    clock = StageClock(device, rss=True)
    base = dict(rss_gb=proc_status().get("VmRSS", 0) / GB, process_peak_gb=clock.hwm_max / GB)
    stages = {"imports": base}
    with clock.stage("load"):
        system = cls(folder=Path(args.folder), device=device, quant=args.quant, steps=args.steps,
                     guidance=args.guidance, resolution=args.resolution,
                     max_sequence_length=args.max_sequence_length, clock=clock,
                     **(dict(offload=args.offload, vram_gb=args.vram_gb) if cls is Ours else {}))
    config = system.pipe.transformer.config
    channels = config.channels if cls is Ours else config.in_channels // 4
    side = args.resolution // 8  # Krea2Pipeline.noise(1, H, W, SEED), drawn here without building it for diffusers
    latents = torch.randn((1, channels, side, side), generator=torch.Generator("cpu").manual_seed(SEED))
    with torch.no_grad():
        start = time.perf_counter()
        system.generate(latents)
        sync(device)
        total = time.perf_counter() - start
    for name in ("load", "encode", "denoise", "decode"):
        entry = stages.setdefault(name, {})
        entry["time_s"] = clock.times.get(name, 0.0) / 1e3
        if device.type == "cuda":
            entry.update(peak_gb=clock.peaks.get(name, 0) / GB, reserved_gb=clock.reserved.get(name, 0) / GB,
                         allocated_gb=clock.allocated.get(name, 0) / GB)
        else:
            entry.update(peak_rss_gb=clock.rss_peak.get(name, 0) / GB, rss_gb=clock.rss_after.get(name, 0) / GB,
                         process_peak_gb=clock.process_peak.get(name, 0) / GB)
    peak = max(clock.hwm_max, proc_status().get("VmHWM", 0))
    return dict(system=cls.name, weights=system.weights, stages=stages, end_to_end_s=total,
                process_peak_gb=peak / GB, device=device_name(device))


def child_load(args) -> dict:
    """Load one transformer (quantized folder or float checkpoint) and report time and memory."""
    device = torch.device(args.device)
    from krea2_lite import load_transformer

    prewarm_quant(args.quant)
    before = proc_status().get("VmRSS", 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = load_transformer(args.folder, device=device, dtype=model_dtype(device), progress=False)
    sync(device)
    elapsed = time.perf_counter() - start
    out = dict(load_s=elapsed, rss_before_gb=before / GB, maxrss_gb=maxrss_bytes() / GB,
               rss_after_gb=proc_status().get("VmRSS", 0) / GB,
               parameters=sum(p.numel() for p in model.parameters()))
    if device.type == "cuda":
        out.update(peak_gb=torch.cuda.max_memory_allocated(device) / GB,
                   allocated_gb=torch.cuda.memory_allocated(device) / GB)
    return out


def run_child(args, child: str, folder: Path, quant: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vram", "--child", child, "--folder", str(folder),
           "--device", args.device, "--preset", args.preset, "--quant", quant or args.quant,
           "--resolution", str(args.resolution), "--steps", str(args.steps), "--guidance", str(args.guidance),
           "--max-sequence-length", str(args.max_sequence_length), "--offload", args.offload]
    if args.vram_gb is not None:
        cmd += ["--vram-gb", str(args.vram_gb)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    results = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"child {child} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(results[-1])


def run_quantizer(source: Path, dtype: str, out: Path) -> dict:
    """`python -m krea2_lite.quantize` in its own process: wall time and that process's peak RSS."""
    if out.exists():
        shutil.rmtree(out)
    from krea2_lite import QuantSpec

    spec = QuantSpec.parse(dtype)  # a shortcut (int8-w8a8-rot) becomes the quantizer's flags
    cmd = [sys.executable, "-m", "krea2_lite.quantize", "--model", str(source), "--dtype", spec.dtype,
           "--out", str(out), "--quiet"]
    if spec.activations:
        cmd += ["--activations", spec.activations] + (["--rotate", str(spec.rotate)] if spec.rotate else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS)
        elapsed = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"quantizer failed (exit {code}): {stderr[-2000:]}")
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    return dict(dtype=dtype, source_gb=source_bytes / GB, output_gb=folder_size(out) / GB, quantize_s=elapsed,
                source_bytes=source_bytes, output_bytes=folder_size(out),
                gb_per_s=source_bytes / GB / elapsed,
                quantizer_maxrss_gb=maxrss_bytes(usage) / GB)


# ---- parent ------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--no-quantize", action="store_true", help="skip the quantizer part")
    ap.add_argument("--child", choices=(*CHILDREN, "load"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_common_args(ap, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = child_pipeline(args) if args.child != "load" else child_load(args)
        print(MARK + json.dumps(result), flush=True)
        return 0

    device, status = usable_device(args.device, args.preset)
    if device is None:
        return status
    folder = ensure_preset(args.preset, args.workdir)
    prewarm_quant(args.quant)
    common = dict(device=device_name(device), preset=args.preset, quant=args.quant, offload=args.offload,
                  resolution=args.resolution, steps=args.steps, guidance=args.guidance,
                  date=time.strftime("%Y-%m-%d"), torch=torch.__version__)
    rows, notes = [], []
    for system in ("krea2_lite", *(cls.name for cls in peer_classes(args.quant))):
        try:
            result = run_child(args, system, folder)
        except RuntimeError as exc:
            if system != TorchaoPeer.name:
                raise
            notes.append(f"{system} not measured: {str(exc).strip().splitlines()[-1][:200]}")
            continue
        for stage, figures in result["stages"].items():
            rows.append(dict(kind="pipeline", system=system, weights=result["weights"], stage=stage,
                             **common, **{k: round(v, 4) for k, v in figures.items()}))
    qrow = None
    if not args.no_quantize:
        qdtype = args.quant if args.quant != "none" else "int8"
        prewarm_quant(qdtype)
        qdir = folder.parent / f".{folder.name}-quantized-{qdtype}-{os.getpid()}"
        try:
            q = run_quantizer(folder / "transformer", qdtype, qdir)
            loaded_q = run_child(args, "load", qdir, quant=qdtype)
            loaded_f = run_child(args, "load", folder / "transformer", quant="none")
        finally:
            shutil.rmtree(qdir, ignore_errors=True)
        qrow = dict(kind="quantize", system="krea2_lite", **{**common, "quant": qdtype},
                    **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in q.items()},
                    load_quantized_s=round(loaded_q["load_s"], 4), load_float_s=round(loaded_f["load_s"], 4),
                    load_quantized_maxrss_gb=round(loaded_q["maxrss_gb"], 4),
                    load_float_maxrss_gb=round(loaded_f["maxrss_gb"], 4))
        if device.type == "cuda":
            qrow.update(load_quantized_peak_gb=round(loaded_q["peak_gb"], 4),
                        load_float_peak_gb=round(loaded_f["peak_gb"], 4))
        rows.append(qrow)

    print_tables(args, device, rows, qrow, notes)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        write_chart([r for r in rows if r["kind"] == "pipeline"], args.json.with_suffix(".png"), device.type == "cuda")
    return 0


def print_tables(args, device, rows: list[dict], qrow: dict | None, notes: list[str]) -> None:
    """The markdown tables of the pipeline stages and of the quantizer."""
    dtype = str(model_dtype(device)).replace("torch.", "")
    print(f"\n{device_name(device)} · preset {args.preset} · {dtype} · {args.resolution}² · {args.steps} steps · "
          f"guidance {args.guidance:g} · quant {args.quant} · peer: {peer_note(args.quant, device)} · "
          f"offload {args.offload} · each system in a fresh process, one cold call\n")
    for note in notes:
        print(f"{note}\n")
    pipeline_rows = [r for r in rows if r["kind"] == "pipeline"]
    if device.type == "cuda":
        print("| system | weights | stage | time s | peak allocated GB | reserved GB | allocated after GB |")
        print("|---|---|---|---:|---:|---:|---:|")
        for r in pipeline_rows:
            if r["stage"] == "imports":
                continue
            print(f"| {r['system']} | {r['weights']} | {r['stage']} | {r['time_s']:.2f} | {r['peak_gb']:.3f} | "
                  f"{r['reserved_gb']:.3f} | {r['allocated_gb']:.3f} |")
    else:
        print("| system | weights | stage | time s | peak RSS GB (stage) | RSS GB after | process peak GB so far |")
        print("|---|---|---|---:|---:|---:|---:|")
        for r in pipeline_rows:
            if r["stage"] == "imports":
                print(f"| {r['system']} | {r['weights']} | imports | – | – | {r['rss_gb']:.3f} | "
                      f"{r['process_peak_gb']:.3f} |")
                continue
            print(f"| {r['system']} | {r['weights']} | {r['stage']} | {r['time_s']:.2f} | {r['peak_rss_gb']:.3f} | "
                  f"{r['rss_gb']:.3f} | {r['process_peak_gb']:.3f} |")
    if qrow:
        mem = "peak GB (load, CUDA)" if device.type == "cuda" else "peak RSS GB (load)"
        print(f"\n`python -m krea2_lite.quantize --dtype {qrow['quant']}` on the preset's transformer/ "
              "(wall time includes interpreter start-up)\n")
        print(f"| dtype | source GB | output GB | quantize s | GB/s | quantizer peak RSS GB | load s quantized | "
              f"load s float | {mem} quantized / float |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        qm = (qrow.get("load_quantized_peak_gb"), qrow.get("load_float_peak_gb")) if device.type == "cuda" else \
            (qrow["load_quantized_maxrss_gb"], qrow["load_float_maxrss_gb"])
        print(f"| {qrow['quant']} | {qrow['source_gb']:.4g} | {qrow['output_gb']:.4g} | {qrow['quantize_s']:.2f} | "
              f"{qrow['gb_per_s']:.4g} | {qrow['quantizer_maxrss_gb']:.3f} | {qrow['load_quantized_s']:.2f} | "
              f"{qrow['load_float_s']:.2f} | {qm[0]:.3f} / {qm[1]:.3f} |")


def write_chart(rows: list[dict], path: Path, cuda: bool) -> None:
    """Grouped bars of the per-stage peak; silently skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    key = "peak_gb" if cuda else "peak_rss_gb"
    stages = ["load", "encode", "denoise", "decode"]
    fig, ax = plt.subplots(figsize=(6, 3))
    systems = sorted({r["system"] for r in rows})
    for i, system in enumerate(systems):
        values = [next((r[key] for r in rows if r["system"] == system and r["stage"] == s), 0) for s in stages]
        ax.bar([j + i * 0.4 for j in range(len(stages))], values, width=0.4, label=system)
    ax.set_xticks([j + 0.2 for j in range(len(stages))], stages)
    ax.set_ylabel("peak GB" + (" allocated" if cuda else " RSS"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
