"""`load_vae_encoder`: the Qwen-Image VAE encoder of a diffusers `vae/` folder (or a pipeline folder).

Reads only ``encoder.*`` and ``quant_conv.*`` (never the decoder, never the ``time_conv`` weights a
single frame does not use), builds the 2D encoder on the meta device and assigns the tensors,
converted to ``dtype`` on ``device``.  A VAE folder without encoder weights (a decoder-only copy)
is a `CheckpointKeysError` that says what is missing; text to image never needs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..errors import CheckpointKeysError, CorruptCheckpointError, SafetensorsSetError
from ..model.vae import _convert, _few, _read_config, _resolve_folder, _weight_files
from ..model.vae_encoder import QwenImageVAEEncoder
from ..safetensors_set import check_float_dtype
from .files import open_safetensors

__all__ = ["load_vae_encoder", "ENCODER_PREFIXES"]

ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def _is_encoder_key(key: str) -> bool:
    return key.startswith(ENCODER_PREFIXES) and ".time_conv." not in key


def _locations(files, handles: dict) -> dict[str, Path]:
    """key -> file: a sharded save's index, else every file's own keys."""
    if isinstance(files, dict):
        return files
    location = {}
    for file in files:
        handles[file] = open_safetensors(file)
        location.update((k, file) for k in handles[file].keys())
    return location


def _check_keys(folder: Path, expected: set[str], present: set[str]) -> None:
    missing, unexpected = expected - present, present - expected
    if missing == expected:
        raise CheckpointKeysError(
            f"{folder}: this VAE holds no encoder weights (no encoder.* / quant_conv.* tensors; it is a "
            "decoder-only copy, e.g. a quantized folder written before images in were supported). Text to "
            "image works; for image=, mask_image= or outpaint= pass vae= a full Qwen-Image vae/ folder")
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_few(missing)}"] if missing else []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
        raise CheckpointKeysError(f"{folder}: weights do not match a Qwen-Image VAE encoder with this "
                                  "config.json; " + "; ".join(parts))


def _read(handles: dict, file: Path, key: str, folder: Path) -> torch.Tensor:
    if file not in handles:
        handles[file] = open_safetensors(file)
    try:
        tensor = handles[file].get_tensor(key)
    except SafetensorError as exc:
        raise CorruptCheckpointError(f"{file}: cannot read tensor {key!r} ({exc})") from exc
    except Exception as exc:  # a key the index lists but the shard lacks
        raise CheckpointKeysError(f"{folder}: {file.name} has no tensor {key!r} ({exc})") from exc
    if not tensor.is_floating_point():  # an int / bool tensor would be cast and used
        raise SafetensorsSetError(f"{file}: tensor {key!r} is {tensor.dtype}; the VAE expects floating point")
    return tensor


def load_vae_encoder(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> QwenImageVAEEncoder:
    """The encoder of a diffusers ``vae/`` folder (or the pipeline folder holding one), in eval mode
    with ``requires_grad`` off.  ``encode(x)``: (B, 3, H, W) in [-1, 1] -> latent mean (B, 16, H/8, W/8)."""
    check_float_dtype(dtype)
    folder = _resolve_folder(path)
    config = _read_config(folder)
    with torch.device("meta"):
        model = QwenImageVAEEncoder(config, dtype=dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    handles: dict[Path, Any] = {}
    try:
        location = _locations(_weight_files(folder), handles)
        _check_keys(folder, set(expected), {k for k in location if _is_encoder_key(k)})
        state = {}
        for key in sorted(expected, key=lambda k: (str(location[k]), k)):
            tensor = _convert(key, _read(handles, location[key], key, folder), expected[key], location[key])
            state[key] = tensor.to(device=device, dtype=dtype).contiguous()
    finally:
        handles.clear()
    model.load_state_dict(state, strict=True, assign=True)
    if model.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        model.to(memory_format=torch.channels_last)  # oneDNN takes half-precision convs only so (see vae.py)
    return model.eval().requires_grad_(False)
