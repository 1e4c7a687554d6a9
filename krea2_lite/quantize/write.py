"""Quantize a transformer checkpoint straight into shards: read a block, quantize it, append its
tensors to the current shard, drop it. Host memory holds one block (float tensors as they are read,
plus its quantized form) and never the model, whatever its size or the shard size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointSource
from ..config import Krea2Config
from ..loading.stream import QuantizingPut, model_groups, stream_groups
from ..loading.transformer import quantized_modules, transformer_skeleton
from .format import TRANSFORMER_DIR, group_state, write_quantization_map
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
    try:
        for group in stream_groups(model, source.entries, put, place=lambda g: CPU, mmap=False,
                                   progress=progress, desc=f"quantizing to {spec.name}"):
            for key, tensor in group_state(model, group).items():
                writer.write(key, tensor)
            model.get_submodule(group).to("meta")  # written: drop this group's memory
        names = writer.close()
    finally:
        writer.abort()
    write_quantization_map(model, folder)
    return model, names
