"""The systems the benchmarks compare: krea2_lite's Krea2Pipeline and its peers — diffusers' Krea2Pipeline,
diffusers with its transformer quantized by optimum-quanto (`QuantoConfig`, what a diffusers user does at
that precision) and, where torchao is installed, by torchao (`TorchAoConfig`).

Each system loads one saved folder (benchmarks/pipeline_factory.py) once and wraps its component calls
(encode, denoise, decode) with a `StageClock`, so one end-to-end call yields its stage times (and, on CUDA,
peak memory; with rss=True on the CPU, peak RSS). benchmarks/speed.py times them warmed up and alternated;
benchmarks/vram.py runs each in its own process for memory. Every system runs under `torch.no_grad()`,
never `torch.inference_mode()`: optimum-quanto's int4 fails there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_RESOLUTION, PRESETS, model_dtype, sync
from krea2_lite.quantize.recipe import DTYPES as QUANT_DTYPES, SHORTCUTS as QUANT_SHORTCUTS

PROMPT = "a red fox sitting in the snow"
NEGATIVE = ""
SEED = 0
QUANTS = ("none", *QUANT_DTYPES, *QUANT_SHORTCUTS)  # the library's own list
DEFAULT_STEPS = {"tiny": 4, "medium": 2, "full": 8}
STAGES = ("encode", "denoise", "decode")


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


# ---- the systems ---------------------------------------------------------------------------
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



# ---- the command line options speed.py and vram.py share ---------------------------------------
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


def peer_note(quant: str, device: torch.device) -> str:
    dtype = str(model_dtype(device)).replace("torch.", "")
    if quant == "none":
        return f"diffusers at {dtype}"
    weight = peer_weight_dtype(quant)
    only = "" if quant in QUANT_DTYPES else ", weight-only: it has no W8A8 path"
    return f"diffusers + optimum-quanto {weight} ({dtype} compute{only})"


