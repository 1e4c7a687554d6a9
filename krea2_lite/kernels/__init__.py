"""Compute kernels: each Triton kernel sits beside its plain-torch reference; dispatch picks."""

from .dispatch import attention, fused_attention, kernel_backend, qmatmul, w8a8_linear

__all__ = ["attention", "fused_attention", "kernel_backend", "qmatmul", "w8a8_linear"]
