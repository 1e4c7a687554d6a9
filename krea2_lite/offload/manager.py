"""Applies a MemoryPlan to a pipeline's transformer, text encoder and VAE, and undoes it.

The only place (with streaming.py and swap.py) where krea2_lite moves weights between host and
device after loading.
"""

from __future__ import annotations

import contextlib

import torch

from .planner import MemoryPlan
from .streaming import BlockStreamer
from .swap import ModuleSwap, move_module


class Offloader:
    """Holds the pipeline's placement for one plan: `encoding()` around the text encoder's work."""

    def __init__(self, transformer, text_encoder, vae, plan: MemoryPlan, device: torch.device):
        self.plan, self.device = plan, torch.device(device)
        self.transformer, self.text_encoder, self.vae = transformer, text_encoder, vae
        streamed = tuple(f"blocks.{i}" for i in plan.streamed_blocks)
        self.streamer = (BlockStreamer(transformer, transformer.blocks, plan.streamed_blocks, self.device,
                                       plan.prefetch) if plan.streamed_blocks else None)
        self.transformer_swap = None
        if plan.transformer_leaves_for_encoding:
            self.transformer_swap = ModuleSwap(transformer, self.device, skip=streamed)
            self.transformer_swap.to_device()
        else:
            move_module(transformer, self.device, skip=streamed)
        self.text_swap = None
        if plan.text_encoder == "swap":
            self.text_swap = ModuleSwap(text_encoder, self.device)
        elif plan.text_encoder == "device":
            move_module(text_encoder, self.device)
        else:
            move_module(text_encoder, torch.device("cpu"))
        move_module(vae, self.device)

    @contextlib.contextmanager
    def encoding(self):
        """The text encoder on the device (when the plan swaps it), the transformer out if it must."""
        if self.text_swap is None:
            yield
            return
        if self.transformer_swap is not None:
            self.transformer_swap.to_host()
        self.text_swap.to_device()
        try:
            yield
        finally:
            self.text_swap.to_host()
            if self.transformer_swap is not None:
                self.transformer_swap.to_device()

    def release(self) -> None:
        """Every component back to plain host tensors, hooks removed (before applying another plan)."""
        if self.streamer is not None:
            self.streamer.close()
        for swap in (self.transformer_swap, self.text_swap):
            if swap is not None:
                swap.to_host()
        cpu = torch.device("cpu")
        for module in (self.transformer, self.text_encoder, self.vae):
            move_module(module, cpu)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
