"""The quantized skeleton: a meta-built Krea 2 transformer with its selected linears swapped for
empty QuantizedLinear modules, and what was chosen (`model.quantization`).

Filling it (quantizing each weight as it streams from the checkpoint, or reading a quantized
folder) is `krea2_lite.loading`'s job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import Krea2Config
from ..model import Krea2Transformer
from .qlinear import swap_linears
from ..errors import ArgumentError
from .recipe import QuantSpec, select_linears

logger = logging.getLogger("krea2_lite")


@dataclass
class QuantizationInfo:
    """What was quantized: attached to the model as `model.quantization`."""

    spec: QuantSpec
    modules: list[str]
    kept: dict[str, str]


def build_quantized_skeleton(config: Krea2Config, spec: QuantSpec, dtype: torch.dtype,
                             modules: list[str] | None = None, log: bool = True) -> Krea2Transformer:
    """A meta-device Krea2Transformer whose selected linears are empty QuantizedLinear modules."""
    with torch.device("meta"):
        model = Krea2Transformer(config)
    chosen, kept = select_linears(model, spec, log=log)
    if modules is not None:
        linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        odd = next((m for m in modules if m not in linears), None)
        if odd is not None:
            raise ArgumentError(f"'quant.modules' names {odd!r:.80}, which is not a linear layer of this model")
        chosen = list(modules)
    if not chosen:
        raise ArgumentError(f"the recipe {spec.to_dict()} quantizes no linear layer (check include / exclude "
                            "patterns: fnmatch over names such as blocks.3.attn.wq)")
    swap_linears(model, chosen, spec.dtype, spec.group_for, dtype, spec.activations, spec.rotate_for, spec.rounding)
    if spec.lowrank:  # int4-lr: the same int4 layers, each with its low-rank correction
        from .lowrank import add_lowrank_branches

        add_lowrank_branches(model, chosen, spec.lowrank)
    model.quantization = QuantizationInfo(spec, chosen, kept)
    return model
