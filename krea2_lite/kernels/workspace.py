"""The kernels' state, with an owner: one `KernelWorkspace` per quantized model.

It holds the two things the quantized matmuls keep between layer calls:
* the dequantization scratch: one reused weight buffer per (device, dtype), grown to the largest
  layer that used it (CUDA `auto` paths: weight-only int8 / fp8, and W8A8 `dequant_matmul`);
* the shared quantized activation: inside `sharing(x)`, every W8A8 layer fed this very `x` reuses
  one 8-bit copy of it (the attention's wq/wk/wv/gate, the MLP's gate/up). The scope, not a cache
  that guesses whether `x` changed, decides the lifetime, so it works under `torch.inference_mode()`
  (inference tensors have no version counter) and the copy never outlives the scope.

The quantizer makes the workspace and hands it to the layers it swaps in
(`krea2_lite.quantize.fused.attach_workspace`); the pipeline frees it after denoising, so the
decode phase never holds it. `nbytes` is what it holds now.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from .dispatch import backend_scope

QuantizedActivation = tuple[torch.Tensor, torch.Tensor]  # (values (M, K), per-token scales (M, 1))


class KernelWorkspace:
    """Scratch buffers and the shared quantized activation of one model's kernels."""

    def __init__(self) -> None:
        self._scratch: dict[tuple[str, torch.dtype, bool], torch.Tensor] = {}
        self._shared_input: torch.Tensor | None = None
        self._shared: dict[tuple, QuantizedActivation] = {}

    # ---- dequantization scratch --------------------------------------------------------------
    def scratch(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor | None:
        """A buffer of at least `numel` elements, reused across layers (grown, never shrunk, until
        `release()`); None while autograd records (a saved weight must not be overwritten by the
        next layer)."""
        if torch.is_grad_enabled():
            return None
        # A buffer made under inference_mode is an inference tensor: not writable outside that mode.
        key = (str(device), dtype, torch.is_inference_mode_enabled())
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            self._scratch.pop(key, None)  # free the smaller one before allocating the larger
            buf = self._scratch[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    # ---- shared quantized activation ---------------------------------------------------------
    @contextlib.contextmanager
    def sharing(self, x: torch.Tensor):
        """While open, W8A8 layers given this `x` quantize it once (per activation type and rotation)
        and share the copy. `x` must not be changed in place inside the scope. The kernel backend is
        decided once for the scope (`backend_scope`), so all the layers agree on it."""
        saved = self._shared_input, self._shared
        self._shared_input, self._shared = x, {}
        try:
            with backend_scope():
                yield self
        finally:
            self._shared_input, self._shared = saved

    def shared_activation(self, x: torch.Tensor, key: tuple,
                          quantize: Callable[[], QuantizedActivation]) -> QuantizedActivation:
        """`quantize()`'s result for x, computed once per `key` while `sharing(x)` is open."""
        if x is not self._shared_input:
            return quantize()
        found = self._shared.get(key)
        if found is None:
            found = self._shared[key] = quantize()
        return found

    # ---- size and release --------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Device (or host) bytes held now: scratch buffers plus any shared quantized activation."""
        tensors = list(self._scratch.values()) + [t for pair in self._shared.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def release(self) -> int:
        """Free everything held (the next layer call allocates again); returns the bytes freed."""
        freed = self.nbytes
        self._scratch.clear()
        self._shared.clear()
        return freed

    def __repr__(self) -> str:
        return f"KernelWorkspace({len(self._scratch)} scratch buffer(s), {self.nbytes} bytes)"


def workspaces_of(module: nn.Module) -> list[KernelWorkspace]:
    """The distinct workspaces used by `module`'s layers (one per quantized model inside it)."""
    found: dict[int, KernelWorkspace] = {}
    for sub in module.modules() if isinstance(module, nn.Module) else ():
        workspace = getattr(sub, "workspace", None)
        if isinstance(workspace, KernelWorkspace):
            found.setdefault(id(workspace), workspace)
    return list(found.values())


def release_workspaces(*modules: nn.Module) -> int:
    """Free the kernel workspaces of these modules (e.g. the transformer's before the VAE decode);
    returns the bytes freed."""
    return sum(workspace.release() for module in modules for workspace in workspaces_of(module))
