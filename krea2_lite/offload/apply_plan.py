"""Applies a MemoryPlan to a pipeline's transformer, text encoder and VAE, and undoes it.

The only place (with block_streamer.py, swap.py and reload.py) where krea2_lite moves weights between
host and device after loading.
"""

from __future__ import annotations

import contextlib
import gc

import torch

from .planner import MemoryPlan
from .reload import Reloader, is_dropped
from .block_streamer import BlockStreamer
from .swap import ModuleSwap, move_module


class Offloader:
    """Holds the pipeline's placement for one plan: `encoding()` around the text encoder's work."""

    def __init__(self, transformer, text_encoder, vae, plan: MemoryPlan, device: torch.device, text_loader=None):
        """`text_loader(device=...)` re-reads the text encoder from its files: needed by a "reload" plan, and
        by any plan applied after one (the encoder then holds no weights)."""
        self.plan, self.device = plan, torch.device(device)
        self.transformer, self.text_encoder, self.vae = transformer, text_encoder, vae
        if self.device.type == "cuda":
            _return_pinned_memory()
        self.text_swap = self.text_reload = None
        self._place_text_encoder(text_loader)  # first: a dropped encoder frees host RAM before blocks are pinned
        streamed = tuple(f"blocks.{i}" for i in plan.streamed_blocks)
        self.streamer = (BlockStreamer(transformer, transformer.blocks, plan.streamed_blocks, self.device,
                                       plan.prefetch) if plan.streamed_blocks else None)
        self.transformer_swap = None
        if plan.transformer_leaves_for_encoding:
            self.transformer_swap = ModuleSwap(transformer, self.device, skip=streamed)
            self.transformer_swap.to_device()
        else:
            move_module(transformer, self.device, skip=streamed)
        move_module(vae, self.device)

    def _place_text_encoder(self, text_loader) -> None:
        encoder, place = self.text_encoder, self.plan.text_encoder
        if (place == "reload" or is_dropped(encoder)) and text_loader is None:
            raise ValueError("this memory plan re-reads the text encoder from its files for each call, but the "
                             "pipeline does not know them (load it with Krea2Pipeline.from_pretrained)")
        if place == "reload":
            self.text_reload = Reloader(encoder, text_loader)
            self.text_reload.drop()
            return
        if is_dropped(encoder):  # a previous plan dropped it: read it back for this one
            Reloader(encoder, text_loader).load(torch.device("cpu"))
        if place == "swap":
            self.text_swap = ModuleSwap(encoder, self.device)
        else:
            move_module(encoder, self.device if place == "device" else torch.device("cpu"))

    @contextlib.contextmanager
    def encoding(self):
        """The text encoder on the device (when the plan swaps or re-reads it), the transformer out if it must."""
        if self.text_reload is not None:
            self.text_reload.load(self.device)
            try:
                yield
            finally:
                self.text_reload.drop()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # hand the freed segments back before the transformer's turn
            return
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
        """Every component back to plain host tensors, hooks removed (before applying another plan); a
        dropped text encoder stays dropped until the next plan reads it back."""
        if self.streamer is not None:
            self.streamer.close()
        for swap in (self.transformer_swap, self.text_swap):
            if swap is not None:
                swap.to_host()
        cpu = torch.device("cpu")
        for module in (self.transformer, self.text_encoder, self.vae):
            if module is not self.text_encoder or self.text_reload is None:  # a dropped encoder stays dropped
                move_module(module, cpu)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _return_pinned_memory() -> None:
    """Give the pinned buffers of an earlier plan back to the OS. PyTorch's caching host allocator keeps
    freed pinned blocks for reuse, so without this a plan applied after another one would hold both
    plans' pinned RAM, while the planner counts only its own."""
    gc.collect()  # an earlier plan's streamer may sit in a reference cycle (its forward hooks)
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
        torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
