"""End-to-end pipeline speed of krea2_lite's Krea2Pipeline beside diffusers' Krea2Pipeline.

Both systems load the SAME saved folder (benchmarks/pipeline_factory.py: random weights at the
preset's shapes), get the same prompt ("a red fox sitting in the snow"), the same empty negative
prompt, the same initial noise (`Krea2Pipeline.noise(1, H, W, seed=0)`; diffusers receives it
packed with `krea2_lite.sampling.pack_latents`), the same steps and guidance (Raw: CFG on when
--guidance > 0, default 3.5; mu from the resolution), max_sequence_length 512 (both defaults).

What each figure is. Every repeat calls each pipeline ONCE, end to end (`pipe(prompt, ...)`, PIL
output), with its component calls wrapped by timers, so the stage times are parts of that very
call (on CUDA every timer synchronizes before it starts and before it stops):
  encode_ms    krea2_lite: `pipe.text_encoder.encode(prompts + negatives)` — one batched call,
               tokenization included. diffusers: `pipe.encode_prompt(...)`, summed over its two
               calls (prompt, then negative prompt), tokenization included.
  denoise_ms   krea2_lite: `krea2_lite.sampling.denoise(...)` (the Euler loop; text compaction and
               the schedule are computed just before it, so they fall in "other"). diffusers: the
               `with self.progress_bar(...)` block of `__call__` (its whole denoising loop).
  step_ms      denoise_ms / steps (with CFG, krea2_lite runs one batch-2 forward per step over the
               real text tokens; diffusers two batch-1 forwards over 512 padded, masked tokens).
  decode_ms    `pipe.vae.decode(...)` (krea2_lite's includes un-normalising the latents; diffusers
               does that with two elementwise ops just before the call). krea2_lite uses its
               default tile="auto" (untiled up to 1024², as diffusers).
  end_to_end_ms  the whole `pipe(...)` call, PIL images out.
  other_ms     end_to_end − encode − denoise − decode of the same call, then the median (argument
               checks, latent preparation, schedule, text compaction, PIL conversion). Medians of
               the stages need not add up to the median end-to-end.
  load_s       `from_pretrained` + moving to the device, ONE sample per system (page cache warm:
               the folder was just written or read), not a median.
Systems alternate within each repeat (--order alternate, the default; --order sequential loads
and measures one pipeline at a time, for a card that cannot hold both at the full shape); medians
over --repeats after --warmup untimed calls each.
max_pixel_diff: largest |difference| (0–255) between a peer's image and krea2_lite's of the first timed
repeat (krea2_lite's row: against the diffusers row), a sanity check that both did the same work;
quantized rows differ more.

Dtypes: CPU runs in float32, CUDA in bfloat16 (krea2_lite keeps its VAE in float32 on the CPU).
--quant (any string `krea2_lite.QuantSpec.parse` accepts: int8, fp8, int4, int8-w8a8, ...) quantizes
krea2_lite's transformer while loading (`from_pretrained(..., quant=)`). The peer is then what a
diffusers user does at that precision: the diffusers transformer loaded with
`quantization_config=QuantoConfig(weights_dtype=...)` (optimum-quanto, diffusers' defaults: every
linear quantized), its row labelled e.g. `int8 (quanto)`. quanto through diffusers is weight-only, so
a W8A8 mode is compared with quanto's weight-only peer of the same weight type (labelled "weights
only"). When torchao is importable, a third row `diffusers+torchao` loads the transformer with
`TorchAoConfig(<dtype> weight-only config)`; where torchao cannot run that type on the device, the
row is left out and the reason printed. Every system runs under `torch.no_grad()`, never
`torch.inference_mode()`: optimum-quanto's int4 fails there ("Cannot set version_counter for
inference tensor"). --offload / --vram-gb are passed to krea2_lite's from_pretrained (diffusers
always runs fully resident here).

Minimums: the rows also carry min_step_ms / min_end_to_end_ms (the fastest repeat) and ratios of
those (min_step_vs_peer, min_end_to_end_vs_peer). On a shared or noisy CPU, alternate the systems
and compare minimums over many repeats.

CUDA memory (per stage, last timed repeat): peak_alloc_gb = `torch.cuda.max_memory_allocated()`
during the stage (peak reset at its start) MINUS the other system's resident weights (both
pipelines live in one process when alternating), so it approximates the system alone;
reserved_gb = `torch.cuda.memory_reserved()` after the stage: the allocator's total, shared by
both systems. benchmarks/vram.py measures each system in a fresh process instead.

  python benchmarks/speed.py --device cpu --preset tiny --json /tmp/speed_tiny.json
  python benchmarks/speed.py --device cpu --preset medium --resolution 256 --steps 2
  python benchmarks/speed.py --device cuda --preset full --resolution 1024 --steps 8 --json full.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from pipeline_factory import (DEFAULT_RESOLUTION, PRESETS, usable_device,  # noqa: E402
                              ensure_preset)
from krea2_lite.quantize.recipe import DTYPES as QUANT_DTYPES, SHORTCUTS as QUANT_SHORTCUTS  # noqa: E402

PROMPT = "a red fox sitting in the snow"
NEGATIVE = ""
SEED = 0
QUANTS = ("none", *QUANT_DTYPES, *QUANT_SHORTCUTS)  # the library's own list
DEFAULT_STEPS = {"tiny": 4, "medium": 2, "full": 8}
STAGES = ("encode", "denoise", "decode")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def model_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Accumulates wall time (and, on CUDA, peak memory) of named stages within one call.

    rss=True (benchmarks/vram.py, CPU): also the peak RSS of each stage, by resetting the
    kernel's high-water mark at the stage start (`/proc/self/clear_refs` 5) and reading VmHWM at
    its end; stages must then not nest. The reset also lowers ru_maxrss, so the process's peak
    so far is tracked here instead (`process_peak`: max of every VmHWM read, gaps included).
    """

    def __init__(self, device: torch.device, rss: bool = False):
        self.device = device
        self.rss = rss and Path("/proc/self/clear_refs").exists()
        self.reset()

    def reset(self) -> None:
        self.times: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.reserved: dict[str, float] = {}
        self.allocated: dict[str, float] = {}
        self.rss_peak: dict[str, float] = {}
        self.rss_after: dict[str, float] = {}
        self.process_peak: dict[str, float] = {}
        self.hwm_max = proc_status().get("VmHWM", 0) if getattr(self, "rss", False) else 0

    @contextlib.contextmanager
    def stage(self, name: str):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.rss:
            self.hwm_max = max(self.hwm_max, proc_status().get("VmHWM", 0))  # the gap before this stage
            reset_peak_rss()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.times[name] = self.times.get(name, 0.0) + (time.perf_counter() - start) * 1e3
            if self.device.type == "cuda":
                self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))
                self.reserved[name] = torch.cuda.memory_reserved(self.device)
                self.allocated[name] = torch.cuda.memory_allocated(self.device)
            if self.rss:
                status = proc_status()
                self.rss_peak[name] = max(self.rss_peak.get(name, 0), status.get("VmHWM", 0))
                self.rss_after[name] = status.get("VmRSS", 0)
                self.hwm_max = max(self.hwm_max, status.get("VmHWM", 0))
                self.process_peak[name] = self.hwm_max

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)
        return timed


def proc_status() -> dict[str, int]:
    """Vm* fields of /proc/self/status in bytes (empty where /proc is missing)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Vm") and line.endswith("kB"):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def prewarm_quant(quant: str) -> None:
    """int4 makes optimum-quanto JIT-build (once per environment) and load its C++ extension for
    unpacking; do that before anything is timed."""
    if quant == "int4":
        from krea2_lite.quantize import QuantizedLinear

        QuantizedLinear.from_linear(torch.nn.Linear(128, 128), "int4", 64, torch.float32)


# ---- the two systems -------------------------------------------------------------------------
class System:
    """One pipeline, loaded once, its component calls wrapped by a StageClock."""

    name = ""

    def __init__(self, folder: Path, device: torch.device, quant: str, steps: int, guidance: float,
                 resolution: int, max_sequence_length: int, clock: StageClock | None = None,
                 offload: str = "none", vram_gb: float | None = None):
        self.folder, self.device, self.quant = folder, device, quant
        self.offload, self.vram_gb = offload, vram_gb
        self.steps, self.guidance, self.resolution, self.msl = steps, guidance, resolution, max_sequence_length
        self.clock = clock or StageClock(device)
        self.resident_bytes = 0
        sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.perf_counter()
        self.pipe = self.load()
        sync(device)
        self.load_s = time.perf_counter() - start
        if device.type == "cuda":
            self.resident_bytes = torch.cuda.memory_allocated(device) - before
        self.instrument()

    def load(self):
        raise NotImplementedError

    def instrument(self) -> None:
        raise NotImplementedError

    def generate(self, latents: torch.Tensor) -> list:
        raise NotImplementedError

    def run(self, latents: torch.Tensor) -> tuple[list, dict]:
        """One end-to-end call: (PIL images, {stage: ms, "end_to_end": ms})."""
        self.clock.reset()
        with self.clock.stage("end_to_end"):
            images = self.generate(latents)
        return images, dict(self.clock.times)

    @property
    def weights(self) -> str:
        return str(model_dtype(self.device)).replace("torch.", "")


class Ours(System):
    name = "krea2_lite"

    def load(self):
        from krea2_lite import Krea2Pipeline

        return Krea2Pipeline.from_pretrained(self.folder, device=self.device, dtype=model_dtype(self.device),
                                             quant=None if self.quant == "none" else self.quant,
                                             offload=self.offload, vram_gb=self.vram_gb, progress=False)

    def instrument(self) -> None:
        import krea2_lite.pipeline as module

        pipe, clock = self.pipe, self.clock
        pipe.text_encoder.encode = clock.wrap("encode", pipe.text_encoder.encode)
        pipe.vae.decode = clock.wrap("decode", pipe.vae.decode)
        # `denoise` is a module global of krea2_lite.pipeline: wrap it there (this process only).
        original = getattr(module.denoise, "__wrapped__", module.denoise)
        module.denoise = clock.wrap("denoise", original)

    def generate(self, latents):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.pipe(PROMPT, negative_prompt=NEGATIVE if self.guidance > 0 else None,
                            width=self.resolution, height=self.resolution, steps=self.steps,
                            guidance=self.guidance, latents=latents, max_sequence_length=self.msl, progress=False)
        return out.images

    @property
    def weights(self) -> str:
        base = super().weights
        return base if self.quant == "none" else f"{self.quant} ({base} compute)"


QUANTO_WEIGHTS = {"int8": "int8", "fp8": "float8", "int4": "int4"}  # krea2_lite dtype → QuantoConfig's name


def peer_weight_dtype(quant: str) -> str | None:
    """The weight type of a krea2_lite quant string (int8-w8a8-rot → int8); None for "none"."""
    from krea2_lite import QuantSpec

    return None if quant == "none" else QuantSpec.parse(quant).dtype


def torchao_config(dtype: str):
    """diffusers' TorchAoConfig for weight-only `dtype` (torchao ≥ 0.10 config objects)."""
    import torchao.quantization as tq
    from diffusers import TorchAoConfig

    configs = {"int8": "Int8WeightOnlyConfig", "int4": "Int4WeightOnlyConfig", "fp8": "Float8WeightOnlyConfig"}
    return TorchAoConfig(getattr(tq, configs[dtype])())


class Peer(System):
    """diffusers' Krea2Pipeline; with a quant, its transformer quantized by optimum-quanto (diffusers'
    QuantoConfig) at the same weight type."""

    name = "diffusers"
    backend = "quanto"

    def load(self):
        from diffusers import Krea2Pipeline as DiffusersKrea2Pipeline

        dtype = model_dtype(self.device)
        extra = {}
        weight = peer_weight_dtype(self.quant)
        if weight is not None:
            from diffusers import Krea2Transformer2DModel

            with warnings.catch_warnings():  # diffusers 0.42 deprecates its quanto path (it still works)
                warnings.simplefilter("ignore", FutureWarning)
                extra["transformer"] = Krea2Transformer2DModel.from_pretrained(
                    self.folder, subfolder="transformer", torch_dtype=dtype,
                    quantization_config=self.quantization_config(weight))
        pipe = DiffusersKrea2Pipeline.from_pretrained(self.folder, dtype=dtype, **extra)
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def quantization_config(self, weight: str):
        from diffusers import QuantoConfig

        with warnings.catch_warnings():  # QuantoConfig is deprecated in diffusers 0.42 but works
            warnings.simplefilter("ignore")
            return QuantoConfig(weights_dtype=QUANTO_WEIGHTS[weight])

    @property
    def weights(self) -> str:
        weight = peer_weight_dtype(self.quant)
        if weight is None:
            return super().weights
        only = ", weights only" if weight != self.quant and self.quant not in QUANT_DTYPES else ""
        return f"{weight} ({self.backend}{only})"

    def instrument(self) -> None:
        pipe, clock = self.pipe, self.clock
        pipe.encode_prompt = clock.wrap("encode", pipe.encode_prompt)
        pipe.vae.decode = clock.wrap("decode", pipe.vae.decode)
        original_bar = pipe.progress_bar

        @contextlib.contextmanager
        def timed_bar(*args, **kwargs):  # the denoising loop is the body of this `with`
            with original_bar(*args, **kwargs) as bar, clock.stage("denoise"):
                yield bar

        pipe.progress_bar = timed_bar

    def generate(self, latents):
        from krea2_lite.sampling import pack_latents

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.pipe(PROMPT, negative_prompt=NEGATIVE if self.guidance > 0 else None,
                             height=self.resolution, width=self.resolution, num_inference_steps=self.steps,
                             guidance_scale=self.guidance, latents=pack_latents(latents).to(self.device),
                             max_sequence_length=self.msl, output_type="pil").images


class TorchaoPeer(Peer):
    """diffusers with its transformer quantized by torchao (weight-only) at the same weight type."""

    name = "diffusers+torchao"
    backend = "torchao"

    def quantization_config(self, weight: str):
        return torchao_config(weight)


def torchao_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def max_pixel_diff(a: list, b: list) -> int:
    import numpy as np

    return int(max(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() for x, y in zip(a, b)))


# ---- output ----------------------------------------------------------------------------------
def print_table(rows: list[dict], header: str) -> None:
    print(f"\n{header}\n")
    print("| system | weights | load s | encode ms | step ms | decode ms | other ms | end-to-end ms "
          "| min step ms | min end-to-end ms | step vs diffusers | end-to-end vs diffusers "
          "| min step vs diffusers | min end-to-end vs diffusers | max Δpixel |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = lambda v: f"{v:.2f}×" if v is not None else "–"  # noqa: E731
        print(f"| {r['system']} | {r['weights']} | {r['load_s']:.2f} | {r['encode_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{r['decode_ms']:.1f} | {r['other_ms']:.1f} | {r['end_to_end_ms']:.1f} | {r['min_step_ms']:.1f} | "
              f"{r['min_end_to_end_ms']:.1f} | {ratio(r['step_vs_diffusers'])} | "
              f"{ratio(r['end_to_end_vs_diffusers'])} | {ratio(r['min_step_vs_peer'])} | "
              f"{ratio(r['min_end_to_end_vs_peer'])} | "
              f"{r['max_pixel_diff'] if r['max_pixel_diff'] is not None else '–'} |")
    if any("peak_alloc_gb" in r for r in rows):
        print("\n| system | resident GB | peak GB encode | peak GB denoise | peak GB decode "
              "| reserved GB after decode |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            p = r["peak_alloc_gb"]
            print(f"| {r['system']} | {r['resident_gb']:.2f} | {p['encode']:.2f} | {p['denoise']:.2f} | "
                  f"{p['decode']:.2f} | {r['reserved_gb']['decode']:.2f} |")


def write_chart(rows: list[dict], path: Path, title: str) -> None:
    """Stacked bars of the median stage times; silently skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [f"{r['system']}\n{r['weights']}" for r in rows]
    left = [0.0] * len(rows)
    for stage in ("encode", "denoise", "decode", "other"):
        widths = [r[f"{stage}_ms"] / 1e3 for r in rows]
        ax.barh(labels, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("seconds (median, end to end)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------
def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=PRESETS, default="tiny")
    ap.add_argument("--quant", choices=QUANTS, default="none",
                    help="krea2_lite's transformer quantization; the diffusers peer is quantized by optimum-quanto "
                    "(and torchao, when installed) at the same weight type")
    ap.add_argument("--offload", default="none", choices=["none", "model", "sequential", "auto"],
                    help="krea2_lite's offload mode (from_pretrained(offload=...))")
    ap.add_argument("--vram-gb", type=float, default=None, help="krea2_lite's device budget in GiB (the planner's)")
    ap.add_argument("--resolution", type=int, help="square image side in pixels (default per preset: "
                    + ", ".join(f"{k} {v}" for k, v in DEFAULT_RESOLUTION.items()) + ")")
    ap.add_argument("--steps", type=int, help="sampling steps (default per preset: "
                    + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    ap.add_argument("--guidance", type=float, default=3.5, help="CFG scale (Raw default 3.5; 0 = no CFG, as Turbo)")
    ap.add_argument("--max-sequence-length", type=int, default=512)
    ap.add_argument("--workdir", type=Path, help="where preset folders are cached (see pipeline_factory.py)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: 1 for tiny, whose ops are all "
                    "per-call overhead and thrash when threads contend; torch's choice otherwise)")
    ap.add_argument("--json", type=Path, help="write the rows here (and a PNG chart beside it if matplotlib is there)")


def quiet_libraries() -> None:
    """No loading progress bars from diffusers / transformers in the benchmark output."""
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:
        pass


def check_common_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.vram_gb is not None and args.vram_gb <= 0:
        ap.error(f"--vram-gb must be positive, got {args.vram_gb}")
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.preset]
    args.steps = args.steps or DEFAULT_STEPS[args.preset]
    if args.threads is None and args.preset == "tiny" and args.device == "cpu":
        args.threads = 1
    if args.resolution % 16 or args.resolution <= 0:
        ap.error(f"--resolution must be a positive multiple of 16, got {args.resolution}")
    if args.steps <= 0:
        ap.error("--steps must be positive")
    if args.guidance < 0:
        ap.error("--guidance must be >= 0")


def peer_classes(quant: str) -> list[type]:
    """The peers to measure: diffusers (quanto-quantized when quant is set), and diffusers+torchao
    when a quant is set and torchao is importable."""
    return [Peer] + ([TorchaoPeer] if quant != "none" and torchao_available() else [])


def load_system(cls, notes: list[str], **kwargs) -> System | None:
    """Load one system; an optional peer (torchao) that cannot load here is noted and left out."""
    if cls is not TorchaoPeer:
        return cls(**kwargs)
    try:
        return cls(**kwargs)
    except Exception as exc:  # torchao lacks some types on some devices (e.g. fp8 on a CPU)
        notes.append(f"diffusers+torchao not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None


def measure(args, device: torch.device, folder: Path, notes: list[str]):
    """Load and time every system: (systems, {name: {stage: [ms per repeat]}}, {name: first images})."""
    common = dict(folder=folder, device=device, quant=args.quant, steps=args.steps, guidance=args.guidance,
                  resolution=args.resolution, max_sequence_length=args.max_sequence_length)
    ours_only = dict(offload=args.offload, vram_gb=args.vram_gb)
    classes = [Ours, *peer_classes(args.quant)]
    times, first_images = {}, {}

    def timed_run(s: System, rep: int, latents: torch.Tensor) -> None:
        images, t = s.run(latents)
        t["other"] = t["end_to_end"] - sum(t.get(k, 0.0) for k in STAGES)  # per call, then the median
        for k in (*STAGES, "other", "end_to_end"):
            times.setdefault(s.name, {}).setdefault(k, []).append(t.get(k, 0.0))
        if rep == 0:
            first_images[s.name] = images
        del images
        gc.collect()

    with torch.no_grad():  # never inference_mode: optimum-quanto's int4 fails under it
        if args.order == "alternate":  # every pipeline loaded; systems alternate within each repeat
            loaded = [load_system(cls, notes, **common, **(ours_only if cls is Ours else {})) for cls in classes]
            systems = [s for s in loaded if s is not None]
            latents = systems[0].pipe.noise(1, args.resolution, args.resolution, seed=SEED)
            for s in systems:
                for _ in range(args.warmup):
                    s.run(latents)
            for rep in range(args.repeats):
                for s in systems:
                    timed_run(s, rep, latents)
            return systems, times, first_images
        systems = []  # one pipeline at a time (the pair may not fit on the card together)
        for cls in classes:
            s = load_system(cls, notes, **common, **(ours_only if cls is Ours else {}))
            if s is None:
                continue
            if cls is Ours:
                latents = s.pipe.noise(1, args.resolution, args.resolution, seed=SEED)
            for _ in range(args.warmup):
                s.run(latents)
            for rep in range(args.repeats):
                timed_run(s, rep, latents)
            s.pipe = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            systems.append(s)
    return systems, times, first_images


def make_rows(args, device: torch.device, systems: list, times: dict, first_images: dict) -> list[dict]:
    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in times.items()}
    low = {name: {k: min(v) for k, v in d.items()} for name, d in times.items()}
    ref, ref_low = med["diffusers"], low["diffusers"]
    rows = []
    for s in systems:
        m, lo = med[s.name], low[s.name]
        row = dict(system=s.name, device=device_name(device), preset=args.preset, quant=args.quant,
                   offload=args.offload, resolution=args.resolution, steps=args.steps, guidance=args.guidance,
                   max_sequence_length=args.max_sequence_length, weights=s.weights,
                   kernels=os.environ.get("KREA2_LITE_KERNELS", "auto") if s.name == "krea2_lite" else None,
                   repeats=args.repeats, warmup=args.warmup, order=args.order, load_s=round(s.load_s, 3),
                   encode_ms=round(m["encode"], 2), denoise_ms=round(m["denoise"], 2),
                   step_ms=round(m["denoise"] / args.steps, 2), decode_ms=round(m["decode"], 2),
                   other_ms=round(m["other"], 2), end_to_end_ms=round(m["end_to_end"], 2),
                   min_step_ms=round(lo["denoise"] / args.steps, 2),
                   min_end_to_end_ms=round(lo["end_to_end"], 2),
                   step_vs_diffusers=round(m["denoise"] / ref["denoise"], 3),
                   end_to_end_vs_diffusers=round(m["end_to_end"] / ref["end_to_end"], 3),
                   min_step_vs_peer=round(lo["denoise"] / ref_low["denoise"], 3),
                   min_end_to_end_vs_peer=round(lo["end_to_end"] / ref_low["end_to_end"], 3),
                   max_pixel_diff=max_pixel_diff(first_images["krea2_lite"],
                                                  first_images["diffusers" if s.name == "krea2_lite" else s.name]),
                   date=time.strftime("%Y-%m-%d"), torch=torch.__version__)
        if device.type == "cuda":
            others = sum(o.resident_bytes for o in systems if o is not s) if args.order == "alternate" else 0
            row["resident_gb"] = round(s.resident_bytes / 1e9, 3)
            row["peak_alloc_gb"] = {k: round((s.clock.peaks.get(k, 0) - others) / 1e9, 3) for k in STAGES}
            row["reserved_gb"] = {k: round(s.clock.reserved.get(k, 0) / 1e9, 3) for k in STAGES}
        rows.append(row)
    return rows


def peer_note(quant: str, device: torch.device) -> str:
    dtype = str(model_dtype(device)).replace("torch.", "")
    if quant == "none":
        return f"diffusers at {dtype}"
    weight = peer_weight_dtype(quant)
    only = "" if quant in QUANT_DTYPES else ", weight-only: it has no W8A8 path"
    return f"diffusers + optimum-quanto {weight} ({dtype} compute{only})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--order", choices=("alternate", "sequential"), default="alternate",
                    help="alternate: both pipelines loaded, systems alternated within each repeat (default); "
                    "sequential: one pipeline loaded at a time (for cards that cannot hold both, e.g. full on an H100)")
    args = ap.parse_args()
    check_common_args(ap, args)
    device, status = usable_device(args.device, args.preset)
    if device is None:
        return status

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    folder = ensure_preset(args.preset, args.workdir)
    prewarm_quant(args.quant)
    notes: list[str] = []
    systems, times, first_images = measure(args, device, folder, notes)
    rows = make_rows(args, device, systems, times, first_images)
    header = (f"{device_name(device)} · preset {args.preset} · {str(model_dtype(device)).replace('torch.', '')} · "
              f"{args.resolution}² · {args.steps} steps · guidance {args.guidance:g} · "
              f"quant {args.quant} · peer: {peer_note(args.quant, device)} · "
              f"offload {args.offload} · medians of {args.repeats} after {args.warmup} warm-up, "
              + ("systems alternated" if args.order == "alternate" else "one system at a time"))
    print_table(rows, header)
    for note in notes:
        print(f"\n{note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        write_chart(rows, args.json.with_suffix(".png"), header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
