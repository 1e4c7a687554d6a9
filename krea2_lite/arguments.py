"""Bounds for every argument a user passes; each message names the argument and its allowed range.

Without these, `steps=10**9` allocated gigabytes of schedule and then sampled forever,
`max_sequence_length=10**7` tried to allocate terabytes, `mu=1000` overflowed `exp`, and seeds
≥ 2**64 or floats reached `torch.Generator.manual_seed`.
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import ArgumentError, ArgumentTypeError

MAX_STEPS = 1000  # the released models use 8 (Turbo) or 52 (Raw); more changes nothing visible
MAX_IMAGES = 64  # per call; each image is one more row of every activation
MAX_GUIDANCE = 100.0  # the released models use 0 (Turbo) or 3.5 (Raw)
MU_RANGE = (-20.0, 20.0)  # exp(mu) stays far from overflow; the released shifts are 0.5..1.15
MAX_SEQUENCE_LENGTH = 4096  # tokens; the released model uses 512
MAX_GIB = 1 << 20  # one PiB: larger budgets are typos (or inf)
SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes a uint64


def check_int(name: str, value, low: int, high: int) -> int:
    """An int (not bool, not float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an int in {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise ArgumentError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def check_number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise ArgumentError(f"{name} must be a finite number in {'(' if low_open else '['}{low}, {high}], "
                            f"got {value!r}")
    return value


def check_steps(steps) -> int:
    return check_int("steps", steps, 1, MAX_STEPS)


def check_mu(mu, name: str = "mu") -> float | None:
    return None if mu is None else check_number(name, mu, *MU_RANGE)


def check_seed(seed, num_images: int) -> int:
    """Image i uses seed + i, so the whole range must fit the generator's uint64."""
    return check_int("seed", seed, 0, SEED_LIMIT - 1 - num_images)


def check_gib(name: str, value) -> float | None:
    """A memory budget in GiB: finite and positive (None = not given)."""
    return None if value is None else check_number(name, value, 0.0, MAX_GIB, low_open=True)


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


def check_shift(shift: dict, where: str) -> dict:
    """A scheduler's resolution-shift settings: finite numbers, two distinct sequence lengths."""
    out = {}
    for key, value in shift.items():
        out[key] = check_number(f"{where}: {key}", value, -1e9, 1e9)
    if "base_image_seq_len" in out and "max_image_seq_len" in out and \
            out["base_image_seq_len"] == out["max_image_seq_len"]:
        raise ArgumentError(f"{where}: base_image_seq_len and max_image_seq_len are both "
                            f"{out['base_image_seq_len']}; they must differ (mu is interpolated between them)")
    for key in ("base_shift", "max_shift"):
        if key in out:
            check_mu(out[key], f"{where}: {key}")
    return out


def folder_defaults(own, where: str) -> dict:
    """The `krea2_lite` entry of a model_index.json (the folder's own steps, guidance, mu, size), checked."""
    if not isinstance(own, dict):
        raise ArgumentError(f"{where}: 'krea2_lite' must be a JSON object, found {type(own).__name__}")
    out = dict(own)
    if own.get("steps") is not None:
        out["steps"] = check_int(f"{where}: krea2_lite.steps", own["steps"], 1, MAX_STEPS)
    if own.get("guidance") is not None:
        out["guidance"] = check_number(f"{where}: krea2_lite.guidance", own["guidance"], 0.0, 100.0)
    if own.get("mu") is not None:
        out["mu"] = check_mu(own["mu"], f"{where}: krea2_lite.mu")
    for key in ("width", "height"):
        if own.get(key) is not None:
            out[key] = check_int(f"{where}: krea2_lite.{key}", own[key], 16, 4096)
    return out
