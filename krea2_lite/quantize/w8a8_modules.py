"""What the quantizer swaps into a model besides its linears: the kernel workspace, and for W8A8 the
attention / MLP modules that share one quantized input.

The model files (`krea2_lite/model/`) are the plain spec. W8A8 adds two things that live here:
* `SharedInputAttention`: an `Attention` whose input projections (wq, wk, wv, gate) take one
  quantized copy of their common input instead of quantizing it four times;
* `FusedSwiGLU`: a `SwiGLU` whose gate and up share one quantized input, and whose W8A8 `down`
  quantizes silu(gate)·up itself (the Triton quantizer forms the product in registers, never
  writing it).
Both are subclasses with the same submodules and attributes, so `state_dict()` keys stay the
official ones, and every projection is still an ordinary module call (hooks, such as LoRA's, see
their usual inputs).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.workspace import KernelWorkspace
from ..model.layers import Attention, SwiGLU


class SharedInputAttention(Attention):
    """`Attention` whose four input projections share one quantized copy of x."""

    workspace: KernelWorkspace

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self.workspace.sharing(x):
            return super().project(x)


class FusedSwiGLU(SwiGLU):
    """`SwiGLU` whose gate/up share one quantized x; a W8A8 `down` quantizes silu(gate)·up itself."""

    workspace: KernelWorkspace
    fused_down: bool  # `down` is a W8A8 QuantizedLinear (has `forward_swiglu`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.workspace.sharing(x):
            gate, up = self.gate(x), self.up(x)
        if self.fused_down:
            return self.down.forward_swiglu(gate, up)
        return self.down(F.silu(gate) * up)


# module type → (its sharing subclass, the linears whose being W8A8 makes the swap worth it)
_SWAPS = {Attention: (SharedInputAttention, ("wq", "wk", "wv", "gate")),
          SwiGLU: (FusedSwiGLU, ("gate", "up", "down"))}


def _swapped(module: nn.Module, cls: type, workspace: KernelWorkspace) -> nn.Module:
    """`module` re-made as its subclass `cls`: the very same submodules, parameters and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.workspace = workspace
    return new


def attach_workspace(model: nn.Module, names: list[str]) -> KernelWorkspace:
    """Give the quantized linears `names` of `model` the model's KernelWorkspace (made on first use,
    kept as `model.kernel_workspace`), and swap every Attention / SwiGLU with W8A8 input layers for
    its sharing subclass above. Returns the workspace."""
    workspace = getattr(model, "kernel_workspace", None)
    if workspace is None:
        workspace = KernelWorkspace()
    w8a8 = set()
    for name in names:
        layer = model.get_submodule(name)
        layer.workspace = workspace
        if getattr(layer, "activations", None) is not None:
            w8a8.add(name)
    for name, module in list(model.named_modules()):
        swap = _SWAPS.get(type(module))
        if not name or swap is None:
            continue
        cls, leaves = swap
        if not any(f"{name}.{leaf}" in w8a8 for leaf in leaves):
            continue
        new = _swapped(module, cls, workspace)
        if cls is FusedSwiGLU:
            new.fused_down = f"{name}.down" in w8a8
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    model.kernel_workspace = workspace
    return workspace
