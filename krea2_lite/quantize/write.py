"""Quantize a checkpoint straight into shards: read a block (a decoder layer for the text encoder),
quantize it, append its tensors to the current shard, drop it. Host memory holds one block (float
tensors as they are read, plus its quantized form) and never the model, whatever its size or the
shard size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointSource
from ..config import Krea2Config
from ..loading.stream import QuantizingPut, model_groups, stream_groups
from ..loading.transformer import community_fill, quantized_modules, transformer_skeleton
from .format import TRANSFORMER_DIR, group_state, write_quantization_map
from .qlinear import QuantizedLinear
from .recipe import QuantSpec
from .shards import ShardedWriter

CPU = torch.device("cpu")


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
    put = QuantizingPut(dtype, quantized_modules(model))
    model, put, entries, reader = community_fill(source, config, dtype, model, put)  # GGUF / ComfyUI: dequantized
    try:
        for group in stream_groups(model, entries, put, place=lambda g: CPU, mmap=False, reader=reader,
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
    from ..loading.text_encoder import prepare_text_encoder
    from .text_encoder import check_saveable, text_state, write_text_encoder_files

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
        for group in stream_groups(model, entries, put, place=lambda g: CPU, mmap=False, progress=False,
                                   desc="text encoder"):
            for key, tensor in text_state(model, group).items():
                writer.write(key, tensor)
            model.get_submodule(group).to("meta")  # written: drop this layer's memory
        writer.close()
    finally:
        writer.abort()
    write_text_encoder_files(encoder, folder, check_saveable(encoder))
