"""Pointing a module's parameters and buffers at other storage without changing its state_dict keys.

Offloading never copies a module: it re-binds each tensor slot to a host copy or a device copy.
Parameters keep their `nn.Parameter` object (hooks and optimisers holding it stay valid); only
`.data` changes. Buffers are replaced in `_buffers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

ALIGN = 256  # bytes; every tensor in a flat buffer starts on this boundary (any dtype view is legal)


@dataclass(frozen=True)
class Slot:
    owner: nn.Module
    name: str
    is_param: bool
    path: str  # dotted name inside the root module, for layouts and messages

    def get(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_param else self.owner._buffers)[self.name]

    def bind(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor


def tensor_slots(module: nn.Module, skip: tuple[str, ...] = ()) -> list[Slot]:
    """Every parameter and buffer of `module` (recursively), except under the `skip` prefixes."""
    slots = []
    for mod_name, mod in module.named_modules():
        if any(mod_name == s or mod_name.startswith(s + ".") for s in skip):
            continue
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, tensor in table.items():
                if tensor is not None:
                    slots.append(Slot(mod, name, is_param, f"{mod_name}.{name}" if mod_name else name))
    return slots


@dataclass(frozen=True)
class FlatLayout:
    """Byte offsets of a module's tensors inside one flat uint8 buffer."""

    entries: tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]  # (path, dtype, shape, offset)
    size: int

    @classmethod
    def of(cls, slots: list[Slot]) -> "FlatLayout":
        entries, offset = [], 0
        for slot in slots:
            t = slot.get()
            entries.append((slot.path, t.dtype, tuple(t.shape), offset))
            offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        return cls(tuple(entries), offset)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for _, dtype, shape, offset in self.entries:
            count = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out.append(flat[offset:offset + count].view(dtype).view(shape))
        return out

    def describe(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(p, d, s) for p, d, s, _ in self.entries]
