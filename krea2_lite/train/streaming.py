"""Streamed training: frozen blocks that do not fit the card are streamed through reused device slots
in the forward order, then again in the reverse order during the backward.

The inference streamer (`offload.block_streamer.BlockStreamer`) does the copying. In the forward its
module hooks fetch each streamed block before it runs and evict it after. Per-block gradient
checkpointing recomputes each block's forward inside the backward, last block first, through the
block's plain `forward` (no module hooks): `wrap` puts the fetch there. At the start of block i's
recompute every block of a later index has had its whole backward queued (autograd runs nodes in
reverse creation order), so the slot that block i + 1 used is evicted (a CUDA event on the compute
stream) and block i − 1's copy into it starts while block i computes. LoRA parameters are not block
tensors (the hooks keep them outside the block modules): they stay on the device.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

from ..offload.block_streamer import BlockStreamer


class StreamedTraining:
    """Streams `model.blocks[i]` for i in `streamed` in both directions; `copies` counts host → device copies."""

    def __init__(self, model: nn.Module, streamed, device, prefetch: int = 1):
        self.streamed = frozenset(streamed)
        self.streamer = BlockStreamer(model, model.blocks, sorted(self.streamed), device, prefetch)
        self.in_backward = False

    @property
    def copies(self) -> int:
        return self.streamer.copies

    def wrap(self, index: int, forward):
        """`forward` of block `index` as the checkpoint recomputes it: on the device first when streamed."""
        if index not in self.streamed:
            return forward

        def run(*args, **kwargs):
            if self.in_backward:
                for other in list(self.streamer.bound):
                    if other != index:
                        self.streamer.evict(other)
                self.streamer.fetch(index, direction=-1)
            return forward(*args, **kwargs)

        return run

    @contextlib.contextmanager
    def backward(self):
        """Around `loss.backward()`: the last streamed blocks are prefetched, and every slot handed back after."""
        self.streamer.start(direction=-1)
        self.in_backward = True
        try:
            yield
        finally:
            self.in_backward = False
            for block in list(self.streamer.bound):
                self.streamer.evict(block)

    def close(self) -> None:
        self.streamer.close()
