"""`load_vae_encoder`: the Qwen-Image VAE encoder of a diffusers `vae/` folder (or a pipeline folder).

Reads only ``encoder.*`` and ``quant_conv.*`` (never the decoder, never the ``time_conv`` weights a
single frame does not use), builds the 2D encoder on the meta device and fills it with the loading
layer's one fill routine (`fill.fill_groups`, the decoder's setter: causal-3D kernels keep their
last temporal slice), converted to ``dtype`` on ``device``. A VAE folder without encoder weights (a
decoder-only copy) is a `CheckpointKeysError` that says what is missing; text to image never needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointKeysError
from ..files.weight_files import find_weight_files, tensor_locations
from ..model.vae_encoder import QwenImageVAEEncoder
from .vae import WEIGHTS_NAME, _few, build_and_fill, checked_tensors

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
            "image works; for image=, mask_image= or outpaint= pass vae= a full Qwen-Image vae/ folder")
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_few(missing)}"] if missing else []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
        raise CheckpointKeysError(f"{folder}: weights do not match a Qwen-Image VAE encoder with this "
                                  "config.json; " + "; ".join(parts))


def _checked_entries(folder: Path, expected: dict[str, tuple[int, ...]]) -> dict:
    """{name: (file, key, info)} of the encoder's tensors, every key, dtype and shape checked from the headers."""
    found = tensor_locations(find_weight_files(folder, preferred=WEIGHTS_NAME, single=True, what=WEIGHTS_NAME))
    _check_keys(folder, set(expected), {k for k in found if _is_encoder_key(k)})
    return checked_tensors(found, expected)


def load_vae_encoder(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> QwenImageVAEEncoder:
    """The encoder of a diffusers ``vae/`` folder (or the pipeline folder holding one), in eval mode
    with ``requires_grad`` off.  ``encode(x)``: (B, 3, H, W) in [-1, 1] -> latent mean (B, 16, H/8, W/8)."""
    model = build_and_fill(QwenImageVAEEncoder, path, dtype, device, _checked_entries, "VAE encoder")
    if model.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        model.to(memory_format=torch.channels_last)  # oneDNN takes half-precision convs only so (see model/vae.py)
    return model.eval().requires_grad_(False)
