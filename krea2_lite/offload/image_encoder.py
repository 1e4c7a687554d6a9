"""The VAE encoder's placement: kept in host memory, on the device only while it encodes an input
image (images in), then its device copies are dropped. It is small (19.3M parameters in 2D, of the
checkpoint's 53.6M), so the copy costs milliseconds against the encode; the planner counts it in its
own "image" phase.
"""

from __future__ import annotations

import contextlib

import torch

from .swap import ModuleSwap


class ImageEncoderPlacement:
    """`encoding()`: the encoder on `device` inside the block, on its (pinned, on CUDA) host copy after."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device):
        self.encoder, self.device = encoder, torch.device(device)
        self.swap = ModuleSwap(encoder, self.device) if self.device.type != "cpu" else None

    @contextlib.contextmanager
    def encoding(self):
        if self.swap is None:
            yield self.encoder
            return
        self.swap.to_device()
        try:
            yield self.encoder
        finally:
            self.swap.to_host()  # empties the CUDA cache too: the transformer's turn comes next
