"""Quantize a Krea 2 transformer while it streams from its checkpoint, one tensor at a time.

Each tensor is read with a plain file read (no memory map), quantized in row slices and
dropped, so host memory peaks near one float tensor + the quantized model so far + a fixed
overhead — never the whole float model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..checkpoint import CheckpointSource, assign_tensor, read_tensor
from ..config import Krea2Config
from ..model import Krea2Transformer
from .qlinear import swap_linears
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
        chosen = list(modules)
    swap_linears(model, chosen, spec.dtype, spec.group_for, dtype, spec.activations, spec.rotate_for)
    if spec.lowrank:  # int4-lr: the same int4 layers, each with its low-rank correction
        from .lowrank import add_lowrank_branches

        add_lowrank_branches(model, chosen, spec.lowrank)
    model.quantization = QuantizationInfo(spec, chosen, kept)
    return model


def load_quantizing(source: CheckpointSource, config: Krea2Config, spec: QuantSpec, *,
                    device: torch.device, dtype: torch.dtype, progress: bool | None = None) -> Krea2Transformer:
    """Stream `source` into a quantized model (tensors in file order, quantized on `device`)."""
    from tqdm.auto import tqdm

    model = build_quantized_skeleton(config, spec, dtype)
    quantized = set(model.quantization.modules)
    order = sorted(source.entries, key=lambda n: (str(source.entries[n][0]), source.entries[n][2].start))
    with tqdm(total=len(order), desc=f"quantizing to {spec.name}", unit="tensor",
              disable=(not progress) if progress is not None else None, leave=False) as bar:
        for name in order:
            file, _, info = source.entries[name]
            tensor = read_tensor(file, info)
            owner, _, leaf = name.rpartition(".")
            if owner in quantized and leaf == "weight":
                model.get_submodule(owner).set_weight(tensor.to(device))
            else:
                assign_tensor(model, name, tensor, device, dtype)
            del tensor
            bar.update()
    return model.eval()
