"""`load_vae_encoder`: the Qwen-Image VAE encoder of a diffusers `vae/` folder (or a pipeline folder).

Reads only ``encoder.*`` and ``quant_conv.*`` (never the decoder, never the ``time_conv`` weights a
single frame does not use), through the same fill routine and the same per-tensor conversion as the
decoder (`loading.vae`). A VAE folder without encoder weights (a decoder-only copy) is a
`CheckpointKeysError` that says what is missing; text to image never needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointKeysError, SafetensorsSetError, ShapeMismatchError
from ..files.dtypes import SAFETENSORS_DTYPES, check_float_dtype
from ..files.weight_files import find_weight_files, tensor_locations
from ..model.vae_encoder import QwenImageVAEEncoder
from .fill import fill_groups, unloaded
from .vae import WEIGHTS_NAME, VaeSetter, _converted_shape, _few, _read_config, _resolve_folder

__all__ = ["load_vae_encoder", "ENCODER_PREFIXES"]

ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def _is_encoder_key(key: str) -> bool:
    return key.startswith(ENCODER_PREFIXES) and ".time_conv." not in key


def _check_keys(folder: Path, expected: set[str], present: set[str]) -> None:
    missing, unexpected = expected - present, present - expected
    if missing == expected:
        raise CheckpointKeysError(
            f"{folder}: this VAE holds no encoder weights (no encoder.* / quant_conv.* tensors; it is a "
            "decoder-only copy, e.g. a quantized folder written before images in were supported). Text to "
            "image works; for image=, mask_image=, outpaint= or training pass a full Qwen-Image vae/ folder")
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_few(missing)}"] if missing else []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
        raise CheckpointKeysError(f"{folder}: weights do not match a Qwen-Image VAE encoder with this "
                                  "config.json; " + "; ".join(parts))


def _checked_entries(folder: Path, expected: dict[str, tuple[int, ...]]) -> dict:
    weights = find_weight_files(folder, preferred=WEIGHTS_NAME, single=True, what=WEIGHTS_NAME)
    found = tensor_locations(weights)
    _check_keys(folder, set(expected), {k for k in found if _is_encoder_key(k)})
    for key in expected:
        file, info = found[key]
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None or not dtype.is_floating_point:
            raise SafetensorsSetError(f"{file}: tensor {key!r} is {dtype or info.dtype}; the VAE expects floating point")
        converted = _converted_shape(key, tuple(info.shape), expected[key])
        if converted != expected[key]:
            raise ShapeMismatchError(f"{file}: tensor {key!r} has shape {converted}, the config implies {expected[key]}")
    return {key: (found[key][0], key, found[key][1]) for key in expected}


def load_vae_encoder(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> QwenImageVAEEncoder:
    """The encoder of a diffusers ``vae/`` folder (or the pipeline folder holding one), in eval mode
    with ``requires_grad`` off.  ``encode(x)``: (B, 3, H, W) in [-1, 1] -> latent mean (B, 16, H/8, W/8)."""
    check_float_dtype(dtype)
    device = torch.device(device)
    folder = _resolve_folder(path)
    config = _read_config(folder)
    with torch.device("meta"):
        model = QwenImageVAEEncoder(config, dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    entries = _checked_entries(folder, expected)
    for _ in fill_groups(model, entries, VaeSetter(dtype, expected), place=lambda group: device, mmap=True,
                         progress=False, desc="loading VAE encoder"):
        pass
    left = unloaded(model)
    if left:
        raise RuntimeError(f"{folder}: VAE encoder tensors left unloaded: {left[:5]}")
    if model.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        model.to(memory_format=torch.channels_last)  # oneDNN takes half-precision convs only so (see model/vae.py)
    return model.eval().requires_grad_(False)
