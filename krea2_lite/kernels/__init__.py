"""Compute kernels: each Triton kernel sits beside its plain-torch reference; dispatch picks."""

from .dispatch import attention, kernel_backend

__all__ = ["attention", "kernel_backend"]
