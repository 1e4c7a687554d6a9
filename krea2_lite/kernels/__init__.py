"""Compute kernels: each Triton kernel sits beside its plain-torch reference; dispatch picks."""

from .dispatch import attention, backend_scope, fused_attention, gguf_linear, kernel_backend, qmatmul, w8a8_linear
from .workspace import KernelWorkspace

__all__ = ["KernelWorkspace", "attention", "backend_scope", "fused_attention", "gguf_linear", "kernel_backend",
           "qmatmul", "w8a8_linear"]
