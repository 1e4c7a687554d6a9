"""`load_vae_decoder`: a diffusers ``vae/`` folder (``AutoencoderKLQwenImage``) into the 2D decoder of
`krea2_lite.model.vae`, through the one fill routine (`loading.fill`).

Only ``post_quant_conv.*`` and ``decoder.*`` are read (``encoder.*``, ``quant_conv.*`` and the unused
``time_conv`` weights never are). Every key, dtype and shape is checked from the headers before a
tensor is read; each tensor is converted on its way in: a causal-3D kernel keeps its last temporal
slice, a (C, 1, 1, 1) norm gamma becomes (C, 1, 1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .. import checks
from ..errors import (CheckpointKeysError, CheckpointNotFoundError, CorruptCheckpointError, NotKrea2CheckpointError,
                      SafetensorsSetError, ShapeMismatchError, UnsafeCheckpointFormatError)
from ..files.dtypes import SAFETENSORS_DTYPES, check_float_dtype
from ..files.jsonfile import read_json
from ..files.weight_files import PICKLE_SUFFIXES, find_weight_files, tensor_locations
from ..model.vae import QwenImageVAEConfig, QwenImageVAEDecoder
from .fill import fill_groups, set_tensor, unloaded

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "AutoencoderKLQwenImage"


def _is_skipped_key(key: str) -> bool:
    """Checkpoint tensors the image decoder never needs (and never reads)."""
    return key.startswith(("encoder.", "quant_conv.")) or (key.startswith("decoder.") and ".time_conv." in key)


def _resolve_folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"VAE folder not found: {p}")
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeCheckpointFormatError(
                f"{p}: pickle-based checkpoints are refused (never unpickled); pass a diffusers vae/ folder "
                f"holding config.json and {WEIGHTS_NAME}")
        raise CheckpointNotFoundError(
            f"{p} is a file; pass the diffusers vae/ folder (config.json + {WEIGHTS_NAME})")
    if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        p = p / "vae"  # a whole pipeline folder was given
    if not (p / "config.json").is_file():
        raise CheckpointNotFoundError(f"{p}: no config.json (expected a diffusers vae/ folder)")
    return p


def _read_config(folder: Path) -> QwenImageVAEConfig:
    data = read_json(folder / "config.json", what="VAE config")
    cls = data.get("_class_name")
    if cls is not None and cls != CLASS_NAME:
        raise NotKrea2CheckpointError(f"{folder}: config is for {cls!r}, expected {CLASS_NAME!r}")
    try:
        return QwenImageVAEConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{folder / 'config.json'}: {exc}") from exc


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _converted_shape(key: str, stored: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a stored tensor has once converted to this module's layout (see `_convert`)."""
    if len(stored) == 5 and len(shape) == 4:
        return stored[:2] + stored[3:]
    if key.endswith(".gamma") and stored != shape and math.prod(stored) == math.prod(shape):
        return shape
    return stored


def _convert(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Checkpoint tensor → this module's layout: causal-3D kernels keep their last temporal slice,
    (C, 1, 1, 1) norm gammas become (C, 1, 1)."""
    if tensor.ndim == 5 and len(shape) == 4:
        return tensor[:, :, -1]
    return tensor.reshape(shape) if tuple(tensor.shape) != shape else tensor


def _checked_entries(folder: Path, expected: dict[str, tuple[int, ...]]) -> dict:
    """{name: (file, key, info)} of the decoder's tensors, every key, dtype and shape checked from the headers."""
    weights = find_weight_files(folder, preferred=WEIGHTS_NAME, single=True, what=WEIGHTS_NAME)
    found = tensor_locations(weights)
    present = {k for k in found if not _is_skipped_key(k)}
    missing, unexpected = set(expected) - present, present - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
        raise CheckpointKeysError(
            f"{folder}: weights do not match a Qwen-Image VAE decoder with this config.json; " + "; ".join(parts))
    return checked_tensors(found, expected)


def checked_tensors(found: dict, expected: dict[str, tuple[int, ...]]) -> dict:
    """{name: (file, key, info)} for the `expected` keys of `found` (key → (file, header info)), each
    tensor's dtype (floating point) and shape (after the 3D → 2D conversion) checked from the header."""
    for key in sorted(expected, key=lambda k: (str(found[k][0]), k)):
        file, info = found[key]
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None or not dtype.is_floating_point:  # an int / bool tensor would be cast and used
            raise SafetensorsSetError(f"{file}: tensor {key!r} is {dtype or info.dtype}; the VAE expects floating point")
        converted = _converted_shape(key, tuple(info.shape), expected[key])
        if converted != expected[key]:
            raise ShapeMismatchError(
                f"{file}: tensor {key!r} has shape {converted}, the config implies {expected[key]}")
    return {key: (found[key][0], key, found[key][1]) for key in expected}


def build_and_fill(module_class, path, dtype: torch.dtype, device, checked_entries, what: str) -> nn.Module:
    """A VAE half (decoder or encoder) of the `vae/` folder at `path`: built on the meta device from its
    config.json, its tensors (listed and checked by `checked_entries(folder, expected)`) set converted to
    `dtype` on `device` by the one fill routine."""
    check_float_dtype(dtype)
    checks.check_path_argument("path", path, optional=False)  # None / "" / bytes: one typed error
    device = checks.check_device(device) or torch.device("cpu")
    folder = _resolve_folder(path)
    config = _read_config(folder)
    with torch.device("meta"):
        model = module_class(config, dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    entries = checked_entries(folder, expected)
    for _ in fill_groups(model, entries, VaeSetter(dtype, expected), place=lambda group: device, mmap=True,
                         progress=False, desc=f"loading {what}"):
        pass
    left = unloaded(model)
    if left:  # every tensor was checked against the model above; this guards the plan itself
        raise RuntimeError(f"{folder}: {what} tensors left unloaded: {left[:5]}")
    return model


class VaeSetter:
    """Sets each read VAE tensor converted to the decoder's layout, in `dtype`, contiguous."""

    def __init__(self, dtype: torch.dtype, expected: dict[str, tuple[int, ...]]):
        self.dtype, self.expected = dtype, expected

    def __call__(self, model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device) -> None:
        tensor = _convert(tensor, self.expected[name])
        set_tensor(model, name, tensor.to(device=device, dtype=self.dtype).contiguous())

    def finish_group(self, group: str) -> None:
        pass


def load_vae_decoder(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> QwenImageVAEDecoder:
    """Build the decoder of a diffusers ``vae/`` folder and stream in its weights.

    Only ``post_quant_conv.*`` and ``decoder.*`` are read; the module is built on the meta device and
    the tensors are set directly, converted to ``dtype`` on ``device``. Returns the module in eval
    mode with ``requires_grad`` off.
    """
    model = build_and_fill(QwenImageVAEDecoder, path, dtype, device, _checked_entries, "VAE")
    if model.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        model.use_channels_last()
    return model.eval().requires_grad_(False)
