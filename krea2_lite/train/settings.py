"""`TrainSettings`: one LoRA training run's settings, every value checked before anything loads.

Each refusal is one `ArgumentError` naming the argument and what it allows (the CLI prints it as
one `error:` line and exits 2).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import checks
from ..errors import ArgumentError, PromptFileError, UnsafeOutputError
from .run_paths import check_run_paths

# Target groups → the official linear names inside a block (`blocks.N.<leaf>`) or the text fusion.
TARGET_GROUPS = {
    "attn": ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "attn.gate"),
    "qkv": ("attn.wq", "attn.wk", "attn.wv"),
    "mlp": ("mlp.gate", "mlp.up", "mlp.down"),
    "textfusion": (),  # every linear under txtfusion. (see lora_params.target_modules)
}


@dataclass
class TrainSettings:
    model: str | None
    data: str
    output: str
    rank: int = 16
    alpha: float | None = None  # None = rank (factor 1)
    steps: int = 1000
    lr: float = 1e-4
    batch: int = 1
    grad_accum: int = 1
    resolution: int = 1024
    quant: str | None = None
    targets: tuple[str, ...] = ("attn", "mlp")
    seed: int = 0
    save_every: int = 0
    resume: str | None = None
    trigger: str | None = None
    center_crop: bool = True
    flip: bool = False
    transformer: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    cache_dir: str | None = None
    checkpoint_dir: str | None = None
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_sequence_length: int = 512
    vram_gb: float | None = None
    ram_gb: float | None = None
    device: str = "cpu"
    progress: bool = True
    sample_every: int | None = None  # with sample_prompts: images every N steps and at the end (train.samples)
    sample_prompts: str | None = None  # a prompt file (.txt one a line, or .jsonl with "prompt")
    sample_texts: tuple[str, ...] = ()  # the file's prompts, read by check_settings

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(str(self.output) + ".checkpoint")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output).parent / ".krea2_lite_train_cache"

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


MAX_COUNT = 10_000_000  # steps, save / sample intervals: far past any run (the demo learns in 1000 steps)


def _positive_int(name: str, value, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    if value > maximum and name != "rank":  # rank is checked against the layers (train.api)
        raise ArgumentError(f"{name} must be an integer in {minimum}..{maximum}, got {value!r}")
    return value


def _positive_float(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ArgumentError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_output(settings: TrainSettings) -> None:
    """--output must be a new or LoRA file, never one of the inputs nor inside the data folder."""
    out = Path(settings.output)
    if out.suffix != ".safetensors":
        raise ArgumentError(f"--output must end in .safetensors, got {out}")
    if out.is_dir():
        raise UnsafeOutputError(f"--output {out} is a folder; name the LoRA file to write")
    if _inside(out, Path(settings.data)):
        raise UnsafeOutputError(f"--output {out} lies inside the data folder {settings.data}; write it elsewhere")
    for name in ("model", "transformer", "text_encoder", "vae"):
        given = getattr(settings, name)
        if given and Path(given).exists() and (out.resolve() == Path(given).resolve() or
                                               (Path(given).is_dir() and _inside(out, Path(given)))):
            raise UnsafeOutputError(f"--output {out} would overwrite the input --{name.replace('_', '-')} {given}")


def check_samples(settings: TrainSettings) -> None:
    """--sample-every and --sample-prompts come together; the prompt file is read now (PromptFileError)."""
    every, prompts = settings.sample_every, settings.sample_prompts
    if every is None and prompts is None:
        return
    if prompts is None:
        raise ArgumentError("--sample-every needs --sample-prompts FILE (the prompts to sample)")
    if every is None:
        raise ArgumentError("--sample-prompts needs --sample-every N (how often to sample)")
    _positive_int("sample_every", every)
    from ..files.prompt_files import read_prompt_file

    jobs = read_prompt_file(prompts)
    for job in jobs:
        extra = sorted(set(job) - {"prompt", "line"})
        if extra:
            raise PromptFileError(f"{prompts}:{job['line']}: sample prompts take only \"prompt\", found "
                                  f"{', '.join(extra)}")
    settings.sample_texts = tuple(job["prompt"] for job in jobs)


def check_settings(settings: TrainSettings) -> TrainSettings:
    """Every argument checked; returns the settings (targets parsed) or raises one ArgumentError."""
    _positive_int("rank", settings.rank)
    if settings.alpha is not None:
        _positive_float("alpha", settings.alpha)
    _positive_int("steps", settings.steps)
    _positive_float("lr", settings.lr)
    _positive_int("batch", settings.batch)
    _positive_int("grad_accum", settings.grad_accum)
    _positive_int("save_every", settings.save_every, minimum=0)
    if settings.save_every >= settings.steps:  # said, not silently without effect
        warnings.warn(f"save_every={settings.save_every} ≥ steps={settings.steps}: only the final save happens",
                      stacklevel=3)
    _positive_float("max_grad_norm", settings.max_grad_norm)
    res = _positive_int("resolution", settings.resolution, minimum=16, maximum=checks.MAX_SIDE)
    if res % 16:
        raise ArgumentError(f"resolution must be a multiple of 16 (8× VAE, 2× patch), got {res}")
    if isinstance(settings.seed, bool) or not isinstance(settings.seed, int) or not 0 <= settings.seed < 2**63:
        raise ArgumentError(f"seed must be an integer in [0, 2**63), got {settings.seed!r}")
    targets = settings.targets
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGET_GROUPS]
    if not targets or unknown:
        raise ArgumentError(f"targets must be a comma list of {', '.join(TARGET_GROUPS)}, got {settings.targets!r}")
    settings.targets = tuple(targets)
    data = Path(settings.data)
    if not data.is_dir():
        raise ArgumentError(f"--data {data}: no such folder")
    if settings.trigger is not None and (not isinstance(settings.trigger, str) or not settings.trigger.strip()):
        raise ArgumentError("--trigger must be a non-empty word")
    for name in ("vram_gb", "ram_gb"):
        if getattr(settings, name) is not None:
            _positive_float(name, getattr(settings, name))
    checks.check_device(settings.device)
    check_output(settings)
    check_samples(settings)
    if settings.resume is not None and not Path(settings.resume).is_dir():
        raise ArgumentError(f"--resume {settings.resume}: no checkpoint folder there")
    check_run_paths(settings)
    os.fspath(settings.output)
    return settings
