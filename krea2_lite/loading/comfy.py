"""Fill a transformer from a ComfyUI quantized safetensors file (`comfy_quant` describes the layouts).

As stored (quant=None): each quantized layer becomes a QuantizedLinear ("fp8" / "int8", per-tensor or
per-row scales: the existing fp8 / int8 paths) or a ScaledLinear (float8_e5m2, block-scaled int8),
its stored values kept as they are. With `quant`: each layer is dequantized as it streams and handed
to the quantizing put (what the quantize CLI uses to convert a ComfyUI file).
"""

from __future__ import annotations

import torch
from torch import nn

from ..files.checkpoint import CheckpointSource
from ..files.comfy_layouts import check_scale, scale_blocks
from ..config import Krea2Config
from ..quantize.gguf_linear import StoredFormat
from ..quantize.scaled_linear import set_comfy_weight
from .fill import cast_meta_


def comfy_format(source: CheckpointSource) -> StoredFormat:
    """The StoredFormat (module kinds and blocks) of a ComfyUI quantized checkpoint, from headers only."""
    layers, counts = [], {}
    for module, layer in sorted(source.comfy.items()):
        out_features, in_features = source.entries[module + ".weight"][2].shape
        scale_shape = () if layer.scale_key is None else tuple(source.scales[layer.scale_key][2].shape)
        rows, cols = scale_blocks(scale_shape, out_features, in_features, layer.group_size, str(source.location),
                                  layer.scale_key or module)
        if cols == in_features and layer.weight_dtype in ("F8_E4M3", "I8"):  # per tensor or per row
            kind = "fp8" if layer.weight_dtype == "F8_E4M3" else "int8"
        else:
            kind = layer.weight_dtype
        layers.append((module, kind, rows, cols))
        counts[layer.format] = counts.get(layer.format, 0) + 1
    name = "comfy " + "/".join(sorted(counts, key=lambda f: -counts[f]))
    return StoredFormat("comfy", tuple(layers), name)


def _dequantized(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = block
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features // rows, rows, in_features // cols, cols)
    return (w * scale.float().reshape(out_features // rows, 1, in_features // cols, 1)).reshape(weight.shape)


class ComfyPut:
    """Pairs each quantized (or legacy-scaled float) weight with its scale, then either fills the
    stored module (`set_comfy_weight`) or hands the dequantized float weight to `inner`."""

    def __init__(self, inner, source: CheckpointSource, fmt: StoredFormat, stored: dict[str, nn.Module]):
        self.inner, self.stored, self.where = inner, stored, str(source.location)
        self.blocks = {module: (rows, cols) for module, _, rows, cols in fmt.linears}
        self.scale_of = {module: layer.scale_key for module, layer in source.comfy.items()}
        for key in source.scales:  # a float weight's legacy scale_weight
            self.scale_of.setdefault(key.rpartition(".")[0], key)
        self.owner_of = {key: module for module, key in self.scale_of.items() if key}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device) -> None:
        module = self.owner_of.get(name, name[:-len(".weight")] if name.endswith(".weight") else None)
        if module not in self.scale_of:
            return self.inner(model, name, tensor, device)
        parts = self.pending.setdefault(module, {})
        parts["scale" if name in self.owner_of else "weight"] = tensor
        if "weight" not in parts or (self.scale_of[module] and "scale" not in parts):
            return None
        del self.pending[module]
        scale = parts.get("scale", torch.ones(()))
        check_scale(scale, self.where, self.scale_of[module] or module)
        weight = parts["weight"]
        if module in self.stored:
            return set_comfy_weight(self.stored[module], weight.to(device), scale.to(device))
        block = self.blocks.get(module, tuple(weight.shape))  # a legacy float weight: one scale
        self.inner(model, module + ".weight", _dequantized(weight, scale, block), device)

    def finish_group(self, group: str) -> None:
        if self.pending:
            raise RuntimeError(f"{group}: layers without their scale {sorted(self.pending)[:3]}")
        self.inner.finish_group(group)


def comfy_fill(source: CheckpointSource, config: Krea2Config, dtype: torch.dtype, model: nn.Module | None, put):
    """(model, put, entries) for `fill_groups` from a ComfyUI quantized checkpoint. `model` None: the
    stored skeleton and its put (around `put`, the float one); else `model` / `put` (a quantizing
    skeleton) receive every layer dequantized."""
    fmt = comfy_format(source)
    stored = {}
    if model is None:
        model = fmt.skeleton(config, dtype)
        stored = {name: m for name, m in model.named_modules() if name in source.comfy}
        cast_meta_(model, dtype, skip=set(stored))
    return model, ComfyPut(put, source, fmt, stored), {**source.entries, **source.scales}

