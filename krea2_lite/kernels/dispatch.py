"""Picks the kernel backend: `KREA2_LITE_KERNELS` = auto (default) | triton | torch.

`auto` uses Triton kernels on CUDA tensors when Triton imports, torch elsewhere.
`triton` forces them; on a machine without a GPU they then run under the Triton interpreter
(TRITON_INTERPRET=1 must be set before triton is first imported — the tests do that).
`torch` always uses the plain-torch references.
Every fallback away from a requested kernel is logged once, with the reason.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .attention_torch import attention_torch
from .fused_attention_torch import fused_attention_torch

logger = logging.getLogger("krea2_lite.kernels")

BACKENDS = ("auto", "triton", "torch")


def kernel_backend() -> str:
    """The backend named by KREA2_LITE_KERNELS (read on every call, so tests can switch it)."""
    value = os.environ.get("KREA2_LITE_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"KREA2_LITE_KERNELS={value!r} is not one of {', '.join(BACKENDS)}")
    return value


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


@functools.lru_cache(maxsize=None)
def _log_fallback_once(kernel: str, reason: str) -> None:
    logger.info("krea2_lite: %s falls back to torch: %s", kernel, reason)


def use_triton(kernel: str, *tensors: torch.Tensor) -> bool:
    """Decide whether `kernel` runs in Triton for these inputs; log why not when it was wanted."""
    backend = kernel_backend()
    if backend == "torch":
        return False
    if not triton_available():
        if backend == "triton":
            _log_fallback_once(kernel, "triton is not installed")
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        _log_fallback_once(kernel, "tensors are on the CPU and TRITON_INTERPRET is not 1")
        return False
    return True


def log_fallback(kernel: str, reason: str) -> None:
    """For kernels whose wrappers decline an input shape or dtype."""
    _log_fallback_once(kernel, reason)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with SDPA semantics and GQA: q (B,H,L,D), k/v (B,Hkv,L,D), key_mask (B,L) bool.

    Returns (B, H, L, D). Uses the Triton flash kernel when the backend allows and it supports
    the input; otherwise `torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)`.
    """
    if use_triton("attention", q, k, v):
        try:
            from .attention_triton import attention_triton, triton_supports
        except ImportError as exc:  # kernel module not present in this build
            log_fallback("attention", f"Triton attention kernel unavailable ({exc})")
        else:
            reason = triton_supports(q, k, v, key_mask)
            if reason is None:
                return attention_triton(q, k, v, key_mask)
            log_fallback("attention", reason)
    return attention_torch(q, k, v, key_mask)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                    k_scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gate: torch.Tensor,
                    key_mask: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """The Krea 2 block's attention: q/k RMSNorm, RoPE, GQA attention, sigmoid gate.

    q (B, L, H, D), k/v (B, L, Hkv, D) raw projections; q_scale/k_scale (D,) zero-centred norm
    scales; cos/sin (B|1, L, D/2) fp32; gate (B, L, H·D); key_mask (B, L) bool. Returns
    (B, L, H·D). One Triton kernel when allowed, else the plain-torch composition.
    """
    if use_triton("fused_attention", q, k, v, gate):
        from .fused_attention_triton import fused_attention as fused_triton
        from .fused_attention_triton import fused_supports

        reason = fused_supports(q, k, v, q_scale, k_scale, cos, sin, gate, key_mask, eps)
        if reason is None:
            return fused_triton(q, k, v, q_scale, k_scale, cos, sin, gate, key_mask, eps)
        log_fallback("fused_attention", reason)
    return fused_attention_torch(q, k, v, q_scale, k_scale, cos, sin, gate, key_mask, eps)


def qmatmul(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
            dtype: str, group: int | None, out_features: int, in_features: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + bias with W stored quantized (`QuantizedLinear`'s layouts: int8 / fp8 / int4).

    The Triton dequant-matmul with KREA2_LITE_KERNELS=triton when it supports the input;
    otherwise `qmatmul_torch` (dequantize to x.dtype, then `F.linear`).
    """
    from .qmatmul_torch import qmatmul_torch

    # Not yet compiled and timed on a GPU: `auto` keeps the torch path until it has been; the
    # kernel runs when asked for explicitly (KREA2_LITE_KERNELS=triton).
    if kernel_backend() == "triton" and use_triton("qmatmul", x, qdata):
        from .qmatmul_triton import qmatmul_supports, qmatmul_triton

        reason = qmatmul_supports(x, qdata, scale, shift, dtype, group, out_features, in_features, bias)
        if reason is None:
            return qmatmul_triton(x, qdata, scale, shift, dtype, group, out_features, in_features, bias)
        log_fallback("qmatmul", reason)
    return qmatmul_torch(x, qdata, scale, shift, dtype, group, out_features, in_features, bias)
