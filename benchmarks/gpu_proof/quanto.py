"""The diffusers + optimum-quanto peer of the GPU proof (benchmarks/gpu_proof/), run in a child process so that it can be
time-boxed: optimum-quanto compiles C++/CUDA extensions (ninja) the first time a path needs them, which
can take minutes; a child that runs out of time is killed with its whole process group and its rows say
"not measured: extension build exceeded N s".

The peer is what a diffusers user runs: `Krea2Transformer2DModel` with every nn.Linear replaced by
optimum-quanto's QLinear at qint8 / qfloat8 / qint4 and frozen (what diffusers' `QuantoConfig`
quantizer does while loading; here `optimum.quanto.quantize` + `freeze` on random bf16 weights of the
same shape, since no real weights exist), timed under torch.no_grad() (quanto int4 fails under
inference_mode). On CUDA, quanto picks its own kernels: TinyGemm for bf16 int4 (after unpacking with its
CUDA extension), Marlin for fp8 (the extension again), dequantize + cuBLAS for int8.

  python -m benchmarks.gpu_proof.quanto --prewarm --build-dir DIR          # build the extension only
  python -m benchmarks.gpu_proof.quanto --quant int8 int4 --out ROWS.jsonl  # the child the proof starts
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: children run `python -m benchmarks.gpu_proof.quanto`

EXTENSION = {"cuda": "quanto_cuda", "cpu": "quanto_cpp"}
QUANTO_TYPES = {"int8": "qint8", "fp8": "qfloat8", "int4": "qint4"}
NEEDS_EXTENSION = {"cuda": ("fp8", "int4"), "cpu": ("int4",)}


def use_build_dir(device_type: str, build_dir: str) -> None:
    """Point quanto's extension build at `build_dir` (not its site-packages folder, where a killed build
    would leave a stale lock for every later run)."""
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    name = EXTENSION[device_type]
    if is_extension_available(name):
        Path(build_dir).mkdir(parents=True, exist_ok=True)
        get_extension(name).build_directory = str(build_dir)


def python_unpack_on_cpu() -> None:
    """CPU dry run only: quanto's C++ unpack (minutes of compiling on a small CPU) replaced by quanto's own
    python implementation of the same op, so the int4 peer row can run at the tiny shape."""
    import torch
    from optimum.quanto.library.extensions import get_extension

    class PythonUnpack:
        @staticmethod
        def unpack(packed, bits):  # quanto's layout: value i of a byte sits at bits·i, groups of rows concatenated
            mask = (1 << bits) - 1
            return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)

    get_extension("quanto_cpp")._lib = PythonUnpack()


def materialize(model, device, dtype, seed: int = 0) -> None:
    """Random N(0, 0.02) parameters (norm weights 1 + that) generated directly on `device`."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        value = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
        if p.ndim == 1 and name.endswith("weight") and "norm" in name.lower():
            value += 1.0
        owner, _, leaf = name.rpartition(".")
        (model.get_submodule(owner) if owner else model)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    for name, b in list(model.named_buffers()):
        if b.is_meta:
            owner, _, leaf = name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[leaf] = torch.zeros(b.shape, dtype=b.dtype,
                                                                                          device=device)


def quanto_peer(cfg, quant: str, device, dtype):
    """diffusers' Krea2Transformer2DModel, random weights, every nn.Linear quantized by optimum-quanto, frozen."""
    import torch
    from diffusers import Krea2Transformer2DModel
    from optimum import quanto

    from krea2_lite.files.checkpoint import diffusers_transformer_kwargs

    with torch.device("meta"):
        model = Krea2Transformer2DModel(**diffusers_transformer_kwargs(cfg))
    materialize(model, device, dtype)
    quanto.quantize(model, weights=getattr(quanto, QUANTO_TYPES[quant]))
    quanto.freeze(model)
    return model.eval()


def progress(out: Path, **entry) -> None:
    with open(out, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def run_child(args) -> int:
    import torch

    from benchmarks.common import time_one

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    use_build_dir(device.type, args.build_dir)
    if device.type == "cpu":
        python_unpack_on_cpu()
    from benchmarks.gpu_proof.context import preset_config

    ctx = argparse.Namespace(cfg=preset_config(args.preset), device=device, dtype=dtype, resolution=args.resolution,
                             text_tokens=args.text_tokens)
    run = functools.partial(time_one, device=device)
    for quant in args.quant:
        progress(args.out, phase="quantize", quant=quant, t=time.time())
        try:
            _time_peer(args, ctx, quant, run)
        except Exception as exc:  # noqa: BLE001 - one failing type must not cost the others their rows
            from benchmarks.gpu_proof.record import describe

            progress(args.out, phase="error", quant=quant, error=describe(exc))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress(args.out, phase="done")
    return 0


def _time_peer(args, ctx, quant: str, run) -> None:
    import torch

    from benchmarks.gpu_proof.timings import step_inputs

    model = quanto_peer(ctx.cfg, quant, ctx.device, ctx.dtype)
    for batch in (1, 2):
        img, context, t, pos = step_inputs(ctx, batch)
        step = lambda: model(img, context, t, pos, encoder_attention_mask=None, return_dict=False)  # noqa: E731
        progress(args.out, phase="warmup", quant=quant, batch=batch, t=time.time())
        with torch.no_grad():
            for _ in range(args.warmup):
                step()
            times = [run(step) for _ in range(args.repeats)]
        progress(args.out, phase="row", quant=quant, batch=batch, times=times)


def run_prewarm(args) -> int:
    import torch

    from optimum.quanto.library.extensions import get_extension

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    use_build_dir(device_type, args.build_dir)
    started = time.time()
    get_extension(EXTENSION[device_type]).lib
    print(f"built {EXTENSION[device_type]} in {time.time() - started:.0f} s", flush=True)
    return 0


CHILDREN: list[subprocess.Popen] = []  # killed by the proof runner's watchdog if the run overstays


def spawn(argv: list[str], log: Path, jobs: int | None = None) -> subprocess.Popen:
    """This script as a child in its own process group (so a timeout kills ninja and the compilers too)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if jobs:
        env["MAX_JOBS"] = str(jobs)  # leave CPU cores to the timed process
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_proof.quanto", *argv], stdout=fh, stderr=fh,
                                env=env, cwd=ROOT, start_new_session=True)
    CHILDREN.append(proc)
    return proc


def kill(proc: subprocess.Popen) -> None:
    """End the child and everything it started (its process group), by its id."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class Prewarm:
    """The extension build started in the background at the beginning of a CUDA proof run."""

    def __init__(self, ctx):
        self.log = ctx.tmp / "quanto_prewarm.log"
        self.started = time.monotonic()
        self.proc = spawn(["--prewarm", "--build-dir", str(ctx.quanto_build_dir)], self.log,
                          jobs=max(2, (os.cpu_count() or 4) // 2))

    def state(self) -> str:
        """"running" | "built" | "failed: <last log line>"."""
        code = self.proc.poll()
        if code is None:
            return "running"
        if code == 0:
            return "built"
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return f"failed (exit {code}): {lines[-1][:200] if lines else 'no output'}"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait(self, seconds: float) -> str:
        try:
            self.proc.wait(timeout=max(0.0, seconds))
        except subprocess.TimeoutExpired:
            pass
        return self.state()


def _peer_case(ctx, quant: str, batch: int) -> dict:
    return dict(kind="step", case=f"step {ctx.resolution}² b{batch}", batch=batch, resolution=ctx.resolution,
                text_tokens=ctx.text_tokens, system="diffusers+quanto", quant=quant, backend="quanto")


def _run_peer(ctx, quants: list[str], seconds: float) -> tuple[dict, dict, str | None]:
    """Run the child for `quants` within `seconds`: ({(quant, batch): [ms...]}, {quant: error}, why it stopped
    early or None)."""
    out = ctx.tmp / f"quanto_{'_'.join(quants)}.jsonl"
    out.unlink(missing_ok=True)
    argv = ["--build-dir", str(ctx.quanto_build_dir), "--out", str(out), "--device", ctx.device.type,
            "--preset", ctx.preset, "--resolution", str(ctx.resolution), "--text-tokens", str(ctx.text_tokens),
            "--warmup", str(ctx.warmup), "--repeats", str(ctx.repeats), "--quant", *quants]
    if ctx.args.threads:
        argv += ["--threads", str(ctx.args.threads)]
    log = ctx.tmp / "quanto_peer.log"
    proc = spawn(argv, log)
    stopped = None
    try:
        proc.wait(timeout=max(1.0, seconds))
    except subprocess.TimeoutExpired:
        stopped = f"not measured: the peer exceeded its {seconds:.0f} s (killed)"
    finally:
        kill(proc)
    entries = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    rows = {(e["quant"], e["batch"]): e["times"] for e in entries if e.get("phase") == "row"}
    errors = {e["quant"]: e["error"] for e in entries if e.get("phase") == "error"}
    if stopped is None and proc.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        stopped = f"peer failed (exit {proc.returncode}): {lines[-1][:300] if lines else 'no output'}"
    return rows, errors, stopped


CHILD_START_S = 20.0  # a child's imports and CUDA start-up, before it builds anything


def _collect(ctx, section, prewarm, plain: list[str], built: list[str]) -> tuple[dict, dict]:
    """Run the peer children within the section: ({(quant, batch): [ms...]}, {quant: why not measured}).
    One child for every type when the extension is ready; else the types without it first, then the
    others if the build finishes while time is left."""
    per_quant = CHILD_START_S + ctx.estimates.build_s + 2 * ctx.estimates.row(2)
    rows, reasons = {}, {}

    def run(quants):
        if section.left() < per_quant:
            reasons.update({q: section.why_not(per_quant) for q in quants})
            return
        got, errors, stopped = _run_peer(ctx, quants, section.left())
        rows.update(got)
        reasons.update(errors)
        reasons.update({q: stopped for q in quants if stopped and q not in errors})

    state = prewarm.state() if prewarm is not None and built else "built"
    if state == "built":
        run(plain + built)
        return rows, reasons
    if plain:
        run(plain)
    state = prewarm.wait(section.left() - per_quant) if state == "running" else state
    if state == "running":
        kill(prewarm.proc)
        reasons.update({q: f"not measured: extension build exceeded {prewarm.elapsed():.0f} s" for q in built})
    elif state != "built":
        reasons.update({q: f"not measured: extension build {state}" for q in built})
    else:
        run(built)
    return rows, reasons


def run(ctx, rec, section) -> None:
    """The `quanto` section: the peer children, with the extension build the runner started (ctx.prewarm)."""
    quanto_rows(ctx, rec, section, ctx.prewarm)


def quanto_rows(ctx, rec, section, prewarm: "Prewarm | None") -> None:
    """Peer rows for int8 (no extension needed), then int4 / fp8 once the extension is built (or why not)."""
    import statistics

    needs = NEEDS_EXTENSION[ctx.device.type] if ctx.device.type == "cuda" else ()
    plain = [q for q in ("int8", "int4", "fp8") if q not in needs]
    built = [q for q in ("int8", "int4", "fp8") if q in needs]
    rows, reasons = _collect(ctx, section, prewarm, plain, built)
    note = "optimum.quanto.quantize + freeze (diffusers' QuantoConfig path), no_grad"
    for quant in ("int8", "int4", "fp8"):
        for batch in (1, 2):
            times = rows.get((quant, batch))
            if times:
                cpu_int4 = ctx.device.type == "cpu" and quant == "int4"
                rec.timing(ms=round(statistics.median(times), 3), min_ms=round(min(times), 3), repeats=len(times),
                           detail=note + ("; CPU dry run: a python unpack instead of quanto's C++ one" if cpu_int4
                                          else ""), **_peer_case(ctx, quant, batch))
            else:
                rec.timing(ms=None, ok=False, detail=reasons.get(quant) or "not measured",
                           **_peer_case(ctx, quant, batch))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prewarm", action="store_true", help="only build quanto's extension for this machine")
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--quant", nargs="+", choices=sorted(QUANTO_TYPES), default=["int8", "int4", "fp8"])
    ap.add_argument("--out", type=Path, help="progress + rows, JSON lines")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads (as the parent's)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return run_prewarm(args) if args.prewarm else run_child(args)


if __name__ == "__main__":
    sys.exit(main())
