"""LoRA on any Krea2Transformer, quantized or not, without rewriting its weights.

    name = load_lora(transformer, "style.safetensors", scale=0.8)   # several may be loaded at once
    set_lora_scale(transformer, 0.5, name)                           # name=None: every LoRA
    unload_lora(transformer, name)                                   # name=None: every LoRA

A loaded LoRA is an unmerged low-rank branch beside each targeted linear layer,
y = W·x + scale·(alpha/rank)·B(A·x): quantized weights are never dequantized or rewritten, and
the memory added is the LoRA's own A and B (in the activation dtype, on the layer's device).
`merge=True` folds it into dense (non-quantized) weights instead and is refused on quantized ones.
File layouts: see `formats.py` and `names.py`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch.nn as nn

from ..errors import LoraError
from . import adapters
from .formats import LoraPair, read_lora

logger = logging.getLogger("krea2_lite")

__all__ = ["LoraError", "LoraPair", "load_lora", "loaded_loras", "lora_bytes", "set_lora_scale", "unload_lora"]

REGISTRY = "_krea2_loras"


@dataclass
class LoadedLora:
    path: str
    scale: float
    modules: list[str]
    merged: bool


def _registry(transformer: nn.Module) -> dict[str, LoadedLora]:
    # A plain dict in the instance __dict__: nn.Module does not register it, state_dict ignores it.
    return transformer.__dict__.setdefault(REGISTRY, {})


def _linear_layers(transformer: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer, dense (`nn.Linear`) or quantized (anything with `qdata`, in/out_features)."""
    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, nn.Linear) or (hasattr(m, "qdata") and hasattr(m, "in_features"))}


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def _names(transformer: nn.Module, name: str | None) -> list[str]:
    registry = _registry(transformer)
    if name is None:
        return list(registry)
    if name not in registry:
        raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {sorted(registry) or 'none'})")
    return [name]


def load_lora(transformer: nn.Module, path: str | os.PathLike, scale: float = 1.0, name: str | None = None,
              *, merge: bool = False, device=None) -> str:
    """Apply a LoRA file (official krea-2, ComfyUI, diffusers/PEFT or kohya layout); returns its name.

    name defaults to the file's stem. The effective multiplier of each layer is
    scale·alpha/rank. merge=True adds the update into dense weights (exactly undone by
    unload_lora) and raises LoraError if any targeted layer is quantized. `device`: where A and B
    live (None: each layer's current device; an offloading pipeline passes its compute device,
    since streamed blocks sit on the host between uses). The whole file is checked before any
    layer changes, so a failed load leaves the model as it was.
    """
    scale = _check_scale(scale)
    registry = _registry(transformer)
    layers = _linear_layers(transformer)
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    config = getattr(transformer, "config", None)
    file, pairs = read_lora(path, shapes, getattr(config, "layers", 0))
    name = file.stem if name is None else str(name)
    if name in registry:
        raise LoraError(f"a LoRA named {name!r} is already loaded; unload_lora(..., {name!r}) first or pass "
                        "another name=")
    if device is None and any(adapters.layer_device(layers[m]).type == "meta" for m in pairs):
        raise LoraError(f"{file}: the model is on the meta device (not loaded yet); load its weights first")
    if merge:
        quantized = [m for m in pairs if not adapters.is_dense(layers[m])]
        if quantized:
            raise LoraError(f"{file}: merge=True would rewrite quantized weights ({quantized[0]} and "
                            f"{len(quantized) - 1} more are quantized); load it unmerged (merge=False), which "
                            "adds only the LoRA's own weights")
    dtype = getattr(transformer, "compute_dtype", None)
    done = []
    try:
        for module, pair in pairs.items():
            adapters.attach(layers[module], name, pair, scale, dtype or pair.down.dtype, merge=merge, device=device)
            done.append(module)
    except BaseException:  # e.g. out of device memory half-way: leave the model as it was
        for module in done:
            adapters.detach(layers[module], name)
        raise
    registry[name] = LoadedLora(str(file), scale, sorted(pairs), merge)
    ranks = sorted({p.rank for p in pairs.values()})
    logger.info("krea2_lite: LoRA %r from %s on %d layers (rank %s, scale %g%s)", name, file, len(pairs),
                "/".join(map(str, ranks)), scale, ", merged" if merge else "")
    return name


def set_lora_scale(transformer: nn.Module, scale: float, name: str | None = None) -> None:
    """Set the user scale of LoRA `name` (None: of every loaded LoRA). 0 disables it exactly."""
    scale = _check_scale(scale)
    layers = dict(transformer.named_modules())
    for lora in _names(transformer, name):
        entry = _registry(transformer)[lora]
        for module in entry.modules:
            adapters.set_scale(layers[module], lora, scale)
        entry.scale = scale


def unload_lora(transformer: nn.Module, name: str | None = None) -> None:
    """Remove LoRA `name` (None: every LoRA); outputs and weights become exactly what they were."""
    layers = dict(transformer.named_modules())
    registry = _registry(transformer)
    for lora in _names(transformer, name):
        for module in registry[lora].modules:
            adapters.detach(layers[module], lora)
        del registry[lora]


def loaded_loras(transformer: nn.Module) -> dict[str, float]:
    """{name: scale} of the loaded LoRAs, in load order."""
    return {name: entry.scale for name, entry in _registry(transformer).items()}


def lora_bytes(transformer: nn.Module) -> int:
    """Bytes held by the loaded LoRAs' A and B tensors (merged ones' W₀ host copies not counted)."""
    return sum(branch.nbytes for module in transformer.modules()
               if (layer := adapters.layer_loras(module)) is not None for branch in layer.branches.values())
