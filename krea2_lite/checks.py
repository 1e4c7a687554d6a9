"""Every check of a user's call in one place: the bounds, the size rules and the choices that
`Krea2Pipeline`, `plan_memory` and both command lines accept, with their limits named below.

Each refusal is an `ArgumentError` (`ArgumentTypeError` for a wrong type) whose message names the
argument and what it allows. The command lines run these same functions on their flags before any
model loads, so a bad `--steps` reads exactly like a bad `steps=`.

Why bounds at all: without them `steps=10**9` allocated gigabytes of schedule and then sampled
forever, `max_sequence_length=10**7` tried to allocate terabytes, `mu=1000` overflowed `exp`, and
seeds ≥ 2**64 or floats reached `torch.Generator.manual_seed`.

This module sits low (it imports only `errors`, `variants`, torch and the standard library): the
pipeline, the planner, the loaders and the CLI all import it.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings

import torch

from .errors import ArgumentError, ArgumentTypeError
from .variants import VARIANTS

MAX_STEPS = 1000  # the released models use 8 (Turbo) or 52 (Raw); more changes nothing visible
MAX_IMAGES = 64  # per call (all prompts × num_images); each image is one more row of every activation
MAX_CALL_PIXELS = 64 * 1024 * 1024  # per call, all images together: 64 images of 1024², or 4 of 4096²
MAX_PROMPTS = 64  # prompts in one call (each needs at least one image)
MAX_PROMPT_CHARS = 100_000  # one prompt; far past any text encoder's context, and it fits a PNG text chunk
MAX_GUIDANCE = 100.0  # the released models use 0 (Turbo) or 3.5 (Raw)
MU_RANGE = (-20.0, 20.0)  # exp(mu) stays far from overflow; the released shifts are 0.5..1.15
MAX_SEQUENCE_LENGTH = 4096  # prompt tokens; the released model uses 512
MAX_GIB = 1 << 20  # one PiB: larger memory budgets are typos (or inf)
SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes a uint64
MAX_SIDE = 4096  # pixels; Turbo is trained up to 2k, beyond 4k attention cost explodes
SIZE_MULTIPLE = 16  # pixels: the VAE's factor 8 × the transformer's patch 2
SHIFT_SETTING_LIMIT = 1e9  # |a scheduler's shift setting|: finite and far from overflow
# The text encoder runs over the prompt padded to max_sequence_length + 34 − 5 tokens after the
# 34-token system prefix, then the 5-token suffix: max_sequence_length + 34 tokens in all.
TEMPLATE_PREFIX_TOKENS = 34
OFFLOAD_MODES = ("auto", "none", "model", "sequential")
# Where the text encoder may live during a generation, in the planner's order of preference.
TEXT_ENCODER_PLACES = ("device", "swap", "reload", "cpu")


# ---- generic rules -------------------------------------------------------------------------------
def check_int(name: str, value, low: int, high: int) -> int:
    """An int (not bool, not float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an int in {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise ArgumentError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def check_number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with low_open)."""
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number in {interval}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise ArgumentError(f"{name} must be a finite number in {interval}, got {value!r}")
    return value


def check_choice(name: str, value, choices, *, optional: bool = False):
    """One of `choices` (or None when `optional`)."""
    if (value is None and optional) or (value is not None and value in choices):
        return value
    raise ArgumentError(f"{name} must be one of {choices}{' or None' if optional else ''}, got {value!r}")


# ---- one generation's settings -------------------------------------------------------------------
def check_steps(steps) -> int:
    return check_int("steps", steps, 1, MAX_STEPS)


def check_guidance(guidance) -> float:
    return check_number("guidance", guidance, 0.0, MAX_GUIDANCE)


def check_num_images(num_images) -> int:
    return check_int("num_images", num_images, 1, MAX_IMAGES)


def check_mu(mu, name: str = "mu") -> float | None:
    return None if mu is None else check_number(name, mu, *MU_RANGE)


def check_seed(seed, num_images: int) -> int:
    """Image i uses seed + i, so the whole range must fit the generator's uint64."""
    return check_int("seed", seed, 0, SEED_LIMIT - 1 - num_images)


def check_side(name: str, value) -> int:
    """An image width or height in pixels, 1..MAX_SIDE (not yet rounded, see `rounded_side`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an int number of pixels, got {value!r}")
    if not 1 <= value <= MAX_SIDE:
        raise ArgumentError(f"{name} must be in 1..{MAX_SIDE} pixels, got {value}")
    return int(value)


def rounded_side(name: str, value) -> int:
    """A checked side rounded up to SIZE_MULTIPLE, with a warning when that changes it."""
    value = check_side(name, value)
    rounded = SIZE_MULTIPLE * math.ceil(value / SIZE_MULTIPLE)
    if rounded != value:
        # stacklevel 3: rounded_side ← Krea2Pipeline._validate ← __call__
        warnings.warn(f"{name}={value} is not a multiple of {SIZE_MULTIPLE}; using {rounded}", stacklevel=3)
    return rounded


def check_prompts(name: str, value, expected: int | None = None) -> list[str]:
    """A string or a non-empty list of strings → list; `expected` entries when given."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
        raise ArgumentTypeError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    if expected is not None and len(items) != expected:
        raise ArgumentError(f"{name} has {len(items)} entries but there are {expected} prompts")
    if len(items) > MAX_PROMPTS:
        raise ArgumentError(f"{name} has {len(items)} entries; at most {MAX_PROMPTS} in one call")
    long = next((i for i, p in enumerate(items) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise ArgumentError(f"{name}[{long}] has {len(items[long])} characters; at most {MAX_PROMPT_CHARS}")
    return list(items)


def check_path_argument(name: str, value, *, optional: bool = True):
    """A path argument: a str or an os.PathLike giving a str (bytes paths are refused, not decoded)."""
    if value is None and optional:
        return None
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text.strip():
        raise ArgumentTypeError(f"{name} must be a path (str or os.PathLike giving a str), got {value!r:.80}")
    return value


def check_prefetch(prefetch) -> int:
    if isinstance(prefetch, bool) or not isinstance(prefetch, int):
        raise ArgumentTypeError(f"prefetch must be an int >= 1, got {prefetch!r:.40}")
    if prefetch < 1:
        raise ArgumentError(f"prefetch must be an int >= 1, got {prefetch!r}")
    return prefetch


def check_call_total(prompts: int, num_images: int, width: int, height: int) -> int:
    """The whole call bounded before anything is allocated: prompts × num_images ≤ MAX_IMAGES and all
    their pixels ≤ MAX_CALL_PIXELS. Returns the image count."""
    total = prompts * num_images
    if total > MAX_IMAGES:
        raise ArgumentError(f"{prompts} prompts × num_images={num_images} is {total} images; at most {MAX_IMAGES} "
                            "in one call (split the prompts over several calls)")
    if total * width * height > MAX_CALL_PIXELS:
        raise ArgumentError(f"{total} images of {width}×{height} are {total * width * height} pixels; at most "
                            f"{MAX_CALL_PIXELS} in one call (fewer images or a smaller size)")
    return total


def check_call_settings(*, steps=None, guidance=None, mu=None, num_images=1, seed=0, width=None,
                        height=None) -> None:
    """The settings of one pipeline call that do not depend on the model (None: the model's default),
    checked by the same rules `Krea2Pipeline.__call__` applies; the CLI runs this before loading."""
    if steps is not None:
        check_steps(steps)
    if guidance is not None:
        check_guidance(guidance)
    check_mu(mu)
    check_seed(seed, check_num_images(num_images))
    for name, side in (("width", width), ("height", height)):
        if side is not None:
            check_side(name, side)
    check_call_total(1, num_images, width or 1, height or 1)  # one job's pixels bounded before the load


def sequence_limit(text_encoder) -> int:
    """The longest prompt the text encoder can position: its context minus the template's tokens,
    capped at MAX_SEQUENCE_LENGTH."""
    config = getattr(text_encoder, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int) or context <= 0:
        return MAX_SEQUENCE_LENGTH
    template = int(getattr(text_encoder, "prefix_tokens", 0) or 0) + int(getattr(text_encoder, "suffix_tokens", 0) or 0)
    return max(1, min(MAX_SEQUENCE_LENGTH, context - template))


def check_max_sequence_length(value, text_encoder) -> int:
    return check_int("max_sequence_length", value, 1, sequence_limit(text_encoder))


def check_latents(latents, shape: tuple[int, ...]) -> torch.Tensor:
    """User latents: a finite floating tensor of exactly `shape` on a real (not meta) device."""
    if not isinstance(latents, torch.Tensor):
        raise ArgumentTypeError(f"latents must be a torch.Tensor of shape {shape}, got {type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise ArgumentError(f"latents must have shape {tuple(shape)} (images, channels, height/8, width/8), "
                            f"got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise ArgumentTypeError(f"latents must be a floating-point tensor, got {latents.dtype}")
    if latents.device.type == "meta":
        raise ArgumentError("latents are on the meta device (no data); pass a real CPU or CUDA tensor")
    if not torch.isfinite(latents).all():
        raise ArgumentError("latents contain NaN or inf; they must be finite")
    return latents


# ---- loading and memory --------------------------------------------------------------------------
def check_variant(variant, *, optional: bool = True) -> str | None:
    return check_choice("variant", variant, sorted(VARIANTS), optional=optional)


def check_offload(offload) -> str:
    return check_choice("offload", offload, OFFLOAD_MODES)


def check_gib(name: str, value) -> float | None:
    """A memory budget in GiB: finite and positive, at most MAX_GIB (None = not given)."""
    return None if value is None else check_number(name, value, 0.0, MAX_GIB, low_open=True)


def check_device(device) -> torch.device | None:
    """A torch device from a string or device; unknown names become an ArgumentError, and CUDA
    devices must exist here."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if parsed.type == "meta":
        raise ArgumentError("device='meta' holds no data; pass 'cpu' or 'cuda'")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ArgumentError(f"device {device!r}: CUDA is not available on this machine; pass device='cpu'")
        if parsed.index is not None and parsed.index >= count:
            raise ArgumentError(f"device {device!r}: there are {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return parsed


def check_plan_request(mode, vram_gb, host_ram_gb, prefetch, text_encoder_place,
                       text_encoder_reloadable: bool) -> tuple[float | None, float | None]:
    """`plan_memory`'s own arguments; returns (vram_gb, host_ram_gb) as floats (or None)."""
    check_choice("mode", mode, OFFLOAD_MODES)
    if vram_gb is None and mode == "auto":
        raise ArgumentError("vram_gb=None needs a named mode ('none', 'model', 'sequential'): 'auto' plans to "
                            "a budget")
    # finite and positive: inf overflowed int(vram_gb * GiB)
    vram_gb, host_ram_gb = check_gib("vram_gb", vram_gb), check_gib("host_ram_gb", host_ram_gb)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int):
        raise ArgumentTypeError(f"prefetch must be an int >= 1, got {prefetch!r}")
    if prefetch < 1:
        raise ArgumentError(f"prefetch must be an int >= 1, got {prefetch!r}")
    check_choice("text_encoder_place", text_encoder_place, TEXT_ENCODER_PLACES, optional=True)
    if text_encoder_place == "reload" and not text_encoder_reloadable:
        raise ArgumentError("text_encoder_place='reload' needs a text encoder that can be re-read from its files")
    return vram_gb, host_ram_gb


# ---- a model folder's own settings ---------------------------------------------------------------
def check_shift(shift: dict, where: str) -> dict:
    """A scheduler's resolution-shift settings: finite numbers, two distinct sequence lengths."""
    out = {}
    for key, value in shift.items():
        out[key] = check_number(f"{where}: {key}", value, -SHIFT_SETTING_LIMIT, SHIFT_SETTING_LIMIT)
    if "base_image_seq_len" in out and "max_image_seq_len" in out and \
            out["base_image_seq_len"] == out["max_image_seq_len"]:
        raise ArgumentError(f"{where}: base_image_seq_len and max_image_seq_len are both "
                            f"{out['base_image_seq_len']}; they must differ (mu is interpolated between them)")
    for key in ("base_shift", "max_shift"):
        if key in out:
            check_mu(out[key], f"{where}: {key}")
    return out


def folder_defaults(own, where: str) -> dict:
    """The `krea2_lite` entry of a model_index.json (the folder's own steps, guidance, mu, size), checked
    by the call's bounds; a native size is at least one SIZE_MULTIPLE."""
    if not isinstance(own, dict):
        raise ArgumentError(f"{where}: 'krea2_lite' must be a JSON object, found {type(own).__name__}")
    out = dict(own)
    if own.get("steps") is not None:
        out["steps"] = check_int(f"{where}: krea2_lite.steps", own["steps"], 1, MAX_STEPS)
    if own.get("guidance") is not None:
        out["guidance"] = check_number(f"{where}: krea2_lite.guidance", own["guidance"], 0.0, MAX_GUIDANCE)
    if own.get("mu") is not None:
        out["mu"] = check_mu(own["mu"], f"{where}: krea2_lite.mu")
    for key in ("width", "height"):
        if own.get(key) is not None:
            out[key] = check_int(f"{where}: krea2_lite.{key}", own[key], SIZE_MULTIPLE, MAX_SIDE)
    return out
