"""The frozen base during training: quantized linears run backward through their dequantized
weight, and each block is recomputed in the backward (gradient checkpointing).

`QuantizedLinear.forward` takes the inference kernels (the W8A8 ones quantize the activations:
rounding has no gradient), so while training every quantized layer's forward becomes
`F.linear(x, layer.dequantize(x.dtype), bias)` and its W8A8 activation quantization is switched
off; the stored values are never changed. Gradients reach the LoRA branches exactly as through a
float linear holding the dequantized weight (`tests/train/test_gradients.py`).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..quantize.qlinear import QuantizedLinear


def _dequantized_forward(self: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.dequantize(x.dtype), bias)


def _checkpointed(block: nn.Module, forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def training_forward(model: nn.Module, checkpoint_blocks: bool = True, streaming=None):
    """Dequantized-weight forwards for every QuantizedLinear and per-block checkpointing, undone on exit.
    `streaming` (train.streaming.StreamedTraining) fetches streamed blocks for their recompute."""
    saved = []
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            saved.append((module, "activations", module.activations))
            module.activations = None
            module.forward = types.MethodType(_dequantized_forward, module)
    if checkpoint_blocks:
        for index, block in enumerate(model.blocks):
            forward = type(block).forward.__get__(block)
            block.forward = _checkpointed(block, forward if streaming is None else streaming.wrap(index, forward))
    try:
        yield model
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for module in model.modules():
            module.__dict__.pop("forward", None)


def freeze(model: nn.Module) -> nn.Module:
    """Every base parameter frozen (QuantizedLinear holds buffers; float layers hold parameters)."""
    model.requires_grad_(False)
    return model.train(False)  # no dropout in the model; eval keeps any mode-dependent path as inference
