"""The quantized-folder writer, a loader run backwards: quantize a checkpoint straight into shards.

Read a block (a decoder layer for the text encoder), quantize it, append its tensors to the
current shard, drop it. Host memory holds one block (float
tensors as they are read, plus its quantized form) and never the model, whatever its size or the
shard size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Krea2Config
from ..files.checkpoint import CheckpointSource
from ..files.quantized_folder import QUANTIZATION_MAP, TRANSFORMER_DIR
from ..files.shard_writer import ShardedWriter
from ..quantize.qlinear import QUANTO_QTYPE_NAMES, QuantizedLinear
from ..quantize.recipe import QuantSpec
from .fill import QuantizingSetter, fill_groups, model_groups
from .text_encoder import prepare_text_encoder
from .text_encoder_folder import check_saveable, text_state, write_text_encoder_files
from .transformer import community_fill, quantized_modules, transformer_skeleton

CPU = torch.device("cpu")


def group_state(model: torch.nn.Module, group: str) -> dict[str, torch.Tensor]:
    """Every tensor of one group of a (partly) quantized model (`blocks.3`, `txtfusion`, ...) under its
    on-disk name: quantized linears in optimum-quanto's keys, the rest under their own."""
    module = model.get_submodule(group)
    quantized = {f"{group}.{n}" if n else group: m for n, m in module.named_modules()
                 if isinstance(m, QuantizedLinear)}
    state = {}
    for name, sub in quantized.items():
        state.update(sub.quanto_state(name + "."))
    for name, tensor in module.state_dict(prefix=group + ".").items():
        if name.rpartition(".")[0] not in quantized:
            state[name] = tensor
    return {k: v.detach() for k, v in state.items()}


def write_quantization_map(model: torch.nn.Module, folder: Path) -> None:
    """transformer/quantization_map.json: optimum-quanto's {module: {"weights": qtype}}."""
    # quanto's "activations" would mean static calibrated scales; ours are dynamic per token, so the
    # map describes the weights only (for rotated folders: the weights W·H).
    info = model.quantization
    qmap = {name: {"weights": QUANTO_QTYPE_NAMES[info.spec.dtype], "activations": "none"} for name in info.modules}
    (folder / QUANTIZATION_MAP).write_text(json.dumps(qmap, indent=1))


def write_transformer(source: CheckpointSource, config: Krea2Config, spec: QuantSpec, folder: Path, *,
                      max_shard_bytes: int, dtype: torch.dtype = torch.bfloat16,
                      progress: bool | None = None) -> tuple[torch.nn.Module, list[str]]:
    """Write FOLDER/transformer/ (shards, index, quanto map) quantized from `source`.

    Returns the emptied (meta) skeleton, whose `.quantization` says what was quantized, and the
    names of the files written. The layout comes from the meta skeleton, so every shard header is
    known before the first tensor is quantized.
    """
    model = transformer_skeleton(config, spec, dtype)
    layout = [(key, t.dtype, tuple(t.shape)) for group in model_groups(model)
              for key, t in group_state(model, group).items()]
    writer = ShardedWriter(folder / TRANSFORMER_DIR, "model", layout, max_shard_bytes)
    put = QuantizingSetter(dtype, quantized_modules(model))
    model, put, entries, reader = community_fill(source, config, dtype, model, put)  # GGUF / ComfyUI: dequantized
    try:
        for group in fill_groups(model, entries, put, place=lambda g: CPU, mmap=False, reader=reader,
                                   progress=progress, desc=f"quantizing to {spec.name}"):
            for key, tensor in group_state(model, group).items():
                writer.write(key, tensor)
            model.get_submodule(group).to("meta")  # written: drop this group's memory
        names = writer.close()
    finally:
        writer.abort()
    write_quantization_map(model, folder)
    return model, names


def write_text_encoder(source: Path, folder: Path, quant, *, max_shard_bytes: int,
                       dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a saved text-encoder folder (as `save_text_encoder` does) from a Qwen3-VL checkpoint,
    quantizing to `quant` (None: keep `dtype`) a decoder layer at a time, each written and dropped
    before the next is read."""
    encoder, entries, put = prepare_text_encoder(source, device=CPU, dtype=dtype, quant=quant)
    model = encoder.text_model
    for module in model.modules():  # float parameters are built float32 on meta and loaded as `dtype`
        if not isinstance(module, QuantizedLinear):
            for leaf, p in module._parameters.items():
                if p is not None and p.is_meta and p.is_floating_point():
                    module._parameters[leaf] = torch.nn.Parameter(p.to(dtype), requires_grad=False)
    groups = [g for g in model_groups(model) if text_state(model, g)]
    layout = [(k, t.dtype, tuple(t.shape)) for g in groups for k, t in text_state(model, g).items()]
    writer = ShardedWriter(folder, "model", layout, max_shard_bytes)
    try:
        for group in fill_groups(model, entries, put, place=lambda g: CPU, mmap=False, progress=False,
                                   desc="text encoder"):
            for key, tensor in text_state(model, group).items():
                writer.write(key, tensor)
            model.get_submodule(group).to("meta")  # written: drop this layer's memory
        writer.close()
    finally:
        writer.abort()
    write_text_encoder_files(encoder, folder, check_saveable(encoder))
