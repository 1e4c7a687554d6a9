"""Drop-and-reload: a module used once per call (the text encoder) holds no weights between calls.

Its parameters and buffers are replaced by meta tensors after each use and re-read from the
checkpoint files (memory-mapped safetensors) right onto the device before the next, so between
calls it costs page cache, which the kernel may drop, instead of pinned host RAM. The module object
itself (config, tokenizer, hooks on it) stays; only the tensors in its slots come and go.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def _tables(module: nn.Module):
    """(owner, table, name, is_param, path) for every parameter and buffer under `module`."""
    for mod_name, mod in module.named_modules():
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, tensor in table.items():
                if tensor is not None:
                    yield mod, table, name, is_param, f"{mod_name}.{name}" if mod_name else name


def is_dropped(module: nn.Module) -> bool:
    """True when `module` holds meta tensors (weights dropped, to be re-read)."""
    return any(table[name].is_meta for _, table, name, _, _ in _tables(module))


class Reloader:
    """Drops `module`'s tensors and refills them from `loader(device=...)`, a fresh copy of the same
    module read from its files (e.g. `functools.partial(load_text_encoder, path, dtype=..., ...)`)."""

    def __init__(self, module: nn.Module, loader: Callable[..., nn.Module]):
        self.module, self.loader = module, loader
        self.reads = 0  # loads so far (each one reads the module's tensors from the files)

    def drop(self) -> None:
        """Every tensor slot → a meta tensor of the same shape and dtype; the real storage is freed
        as soon as nothing else refers to it."""
        for _, table, name, is_param, _ in list(_tables(self.module)):
            t = table[name]
            empty = torch.empty(t.shape, dtype=t.dtype, device="meta")
            table[name] = nn.Parameter(empty, requires_grad=t.requires_grad) if is_param else empty

    def load(self, device: torch.device) -> None:
        """Read the module's tensors from its files onto `device` and bind them into the slots."""
        fresh = self.loader(device=torch.device(device))
        source = {path: table[name] for _, table, name, _, path in _tables(fresh)}
        targets = list(_tables(self.module))
        if set(source) != {path for *_, path in targets}:
            missing = sorted({path for *_, path in targets} ^ set(source))
            raise RuntimeError(f"the re-read module differs in its tensors from the one it replaces: {missing[:5]}")
        for _, table, name, is_param, path in targets:
            new, old = source[path], table[name]
            if new.shape != old.shape or new.dtype != old.dtype:
                raise RuntimeError(f"{path}: re-read as {tuple(new.shape)} {new.dtype}, "
                                   f"held as {tuple(old.shape)} {old.dtype}")
            table[name] = nn.Parameter(new.detach(), requires_grad=old.requires_grad) if is_param else new
        self.reads += 1
