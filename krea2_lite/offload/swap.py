"""Whole-module offload: a host copy of a module that is bound to the device only while it runs.

Weights are read-only during inference, so moving out is free: the module is re-bound to its host
copy and the device tensors are dropped. Moving in allocates device tensors and copies from the
(pinned, on CUDA) host copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .tensor_slots import tensor_slots


class ModuleSwap:
    """Keeps `module` (minus the submodules named in `skip`) on the host, movable to `device`."""

    def __init__(self, module: nn.Module, device: torch.device, skip: tuple[str, ...] = ()):
        self.device = torch.device(device)
        self.slots = tensor_slots(module, skip)
        pin = self.device.type == "cuda"
        self.host = []
        for slot in self.slots:
            t = slot.get()
            if t.device.type == "cpu" and (t.is_pinned() or not pin):
                host = t  # already a host tensor we may keep (memory-mapped file pages included)
            else:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
                host.copy_(t)
            self.host.append(host)
            slot.bind(host)
        self.on_device = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)

    def to_device(self) -> None:
        if self.on_device:
            return
        for slot, host in zip(self.slots, self.host):
            slot.bind(host.to(self.device, non_blocking=True) if self.device.type == "cuda" else host.clone())
        self.on_device = True

    def to_host(self) -> None:
        if not self.on_device:
            return
        for slot, host in zip(self.slots, self.host):
            slot.bind(host)
        self.on_device = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # let the next component's tensors take the freed segments


def move_module(module: nn.Module, device: torch.device, skip: tuple[str, ...] = ()) -> None:
    """Move `module`'s tensors (except under `skip`) to `device` for good, keeping Parameter objects."""
    for slot in tensor_slots(module, skip):
        t = slot.get()
        if t.device != torch.device(device):
            slot.bind(t.to(device))
