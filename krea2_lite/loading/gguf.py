"""Fill a transformer from a GGUF file, through the one fill routine (`fill.fill_groups`).

As stored (quant=None): each linear whose weight is in a block type becomes a `GGUFLinear` holding
the file's bytes (memory-mapped on the CPU, copied once to a device); float tensors and any other
quantized tensor (rare: a norm scale) are dequantized / cast by the dtype policy like a safetensors
checkpoint's. With `quant` (int8, int4, …): every tensor is dequantized as it streams and quantized
by `QuantizingSetter` (what the quantize CLI uses to convert a GGUF file, block by block).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..files.checkpoint import CheckpointSource
from ..config import Krea2Config
from ..files.gguf_container import GGUFFile, check_block_scales
from ..kernels.gguf_dequant_torch import dequantize_gguf
from ..model import Krea2Transformer
from ..quantize.gguf_linear import GGUFLinear, StoredFormat, gguf_format
from ..files.safetensors_headers import TensorInfo
from .fill import FloatSetter, cast_meta_, set_tensor


class GGUFTensorReader:
    """`fill_groups`' reader for a GGUF file: a kept-quantized linear weight as its stored bytes
    (`keep` names them), everything else as a float tensor (float types straight from the map)."""

    def __init__(self, gguf: GGUFFile, names: dict[str, str], keep: set[str]):
        self.gguf, self.names, self.keep = gguf, names, keep  # names: stored key → official name

    def __call__(self, file: Path, key: str, info: TensorInfo) -> torch.Tensor:
        raw = self.gguf.raw(key)
        if self.gguf.tensors[key].quantized:
            check_block_scales(raw, self.gguf.tensors[key].qtype, f"{file}: tensor '{key}'")
        if self.names[key] in self.keep or not self.gguf.tensors[key].quantized:
            return raw
        return dequantize_gguf(raw, info.dtype, tuple(info.shape))

    def close(self) -> None:
        pass  # the map stays open: kept tensors on the CPU are views of it


class GGUFPut(FloatSetter):
    """A GGUFLinear's weight → its `qdata` (the stored bytes, moved only if the device is not the CPU);
    every other tensor as FloatSetter."""

    def __init__(self, dtype: torch.dtype, linears: dict[str, GGUFLinear]):
        super().__init__(dtype)
        self.linears = linears

    def __call__(self, model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device) -> None:
        owner, _, leaf = name.rpartition(".")
        if owner in self.linears and leaf == "weight":
            set_tensor(model, f"{owner}.qdata", tensor.to(device))
        else:
            super().__call__(model, name, tensor, device)


def gguf_stored_format(source: CheckpointSource, config: Krea2Config) -> StoredFormat:
    """Which linears of `source` (a GGUF checkpoint, official names) stay quantized, and how."""
    with torch.device("meta"):
        model = Krea2Transformer(config)
    return gguf_format({name: info.dtype for name, (_, _, info) in source.entries.items()}, model)


def gguf_fill(source: CheckpointSource, config: Krea2Config, dtype: torch.dtype, model: nn.Module | None, put):
    """(model, put, reader) for `fill_groups` from a GGUF checkpoint. `model` None: the stored
    skeleton (GGUFLinear where the file keeps a linear quantized) and its put; else `model` / `put`
    (a quantizing skeleton) are kept and every tensor is read dequantized."""
    names = {key: name for name, (_, key, _) in source.entries.items()}
    if model is not None:
        return model, put, GGUFTensorReader(source.gguf, names, set())
    model = gguf_stored_format(source, config).skeleton(config, dtype)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    cast_meta_(model, dtype, skip=set(linears))
    return model, GGUFPut(dtype, linears), GGUFTensorReader(source.gguf, names, {n + ".weight" for n in linears})
