"""Picks the kernel backend: `KREA2_LITE_KERNELS` = auto (default) | triton | torch.

The variable is read in one place, `kernel_backend()`, and only when no `backend_scope()` is open:
the pipeline opens one per generation (`Krea2Pipeline._generate`) and each W8A8 sharing scope
(`KernelWorkspace.sharing`) opens one, so every kernel of one call agrees on the backend.
Kernel state (the dequantization scratch, the quantized activation shared by several layers) is
owned by a `KernelWorkspace` (kernels/workspace.py) that the caller passes in; this module keeps
none.

`triton` forces the Triton kernels; on a machine without a GPU they then run under the Triton
interpreter (TRITON_INTERPRET=1 must be set before triton is first imported — the tests do that).
`torch` always uses the plain-torch references. Every fallback away from a requested kernel is
logged once, with the reason.

`auto`, per kernel (nothing Triton-compiled in the matmul family has run on a GPU yet, so `auto`
only picks a Triton matmul kernel once it is known to be correct and fast on the device):
* attention / fused_attention: Triton on CUDA tensors (validated and timed on an H100), torch
  elsewhere.
* qmatmul (weight-only int8 / fp8 / int4): dequantize + cuBLAS everywhere (on CUDA, int8 / fp8
  weights are dequantized into the workspace's reused scratch buffer, bit-identical to
  `qmatmul_torch`; `KernelWorkspace.release()` frees it); the Triton dequant-matmul runs only with
  KREA2_LITE_KERNELS=triton.
* w8a8_linear (dynamic per-token activations): CPU → the torch reference. CUDA → the torch
  activation quantizer, then stock torch GEMMs: int8 `torch._int_mm` (cuBLASLt, exact int32)
  with a torch epilogue; fp8 `torch._scaled_mm` with row-wise scales on sm_89+, and below sm_89
  (no fp8 tensor cores) the activation is quantized, dequantized and multiplied with the
  dequantized weight in one bf16/fp16 cuBLAS GEMM (`dequant_matmul`, same W8A8 semantics).
  Token counts at or above `DEQUANT_MIN_TOKENS[capability]` take `dequant_matmul` for int8 too
  (weight dequantized into the workspace's scratch buffer; `dequant_min_tokens` is the one place
  the table is consulted); the table is empty until
  `benchmarks/bench_kernels.py` has measured where that wins on a card.
  With KREA2_LITE_KERNELS=triton: the Triton quantizer (rotation fused; for `mlp.down` the SwiGLU
  product fused too) and the Triton int8 GEMM; fp8 has no Triton GEMM (`torch._scaled_mm` on
  sm_89+, else dequantized operands through cuBLAS on CUDA, the torch reference on the CPU).
  On every path an activation shared by several W8A8 layers (wq/wk/wv/gate, MLP gate/up) is
  quantized once inside the workspace's `sharing(x)` scope (also under `torch.inference_mode()`).
  `torch._int_mm` needs K and N multiples of 8 (all Krea 2 layers are multiples of 128); other
  shapes take an exact float64 GEMM, correct but slow on a GPU.

Measured exceptions to these defaults come from a committed per-GPU table, `kernels/tuning.json`
(`tuning.auto_choice`; `KREA2_LITE_TUNING` names another file), filled from a run of
`python -m benchmarks.gpu_proof`: per GPU name or capability, per kernel and quant type, the token counts
from which the Triton kernel (or `dequant_matmul`) wins. It holds nothing yet, so every GPU keeps
the defaults above until a proof run on it has been recorded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os

import torch
import torch.nn.functional as F

from ..errors import ArgumentError

from .attention_torch import attention_torch
from .fused_attention_torch import fused_attention_torch
from .tuning import auto_choice

logger = logging.getLogger("krea2_lite.kernels")

BACKENDS = ("auto", "triton", "torch")


# The backend pinned by the innermost open `backend_scope()`; None = none open.
_PINNED: contextvars.ContextVar[str | None] = contextvars.ContextVar("krea2_lite_kernel_backend", default=None)


def _checked(value: str, origin: str) -> str:
    value = value.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ArgumentError(f"{origin}={value[:40]!r} is not one of {', '.join(BACKENDS)}")
    return value


def kernel_backend() -> str:
    """The backend of the current call: the one pinned by an open `backend_scope()`, else the value
    of KREA2_LITE_KERNELS (the only place the variable is read)."""
    pinned = _PINNED.get()
    if pinned is not None:
        return pinned
    return _checked(os.environ.get("KREA2_LITE_KERNELS", "auto"), "KREA2_LITE_KERNELS")


@contextlib.contextmanager
def backend_scope(backend: str | None = None):
    """Decide the backend once for everything run inside (also usable as a decorator).

    `backend` None: keep the backend of an enclosing scope, else read KREA2_LITE_KERNELS now.
    A named backend ("auto" | "triton" | "torch") overrides both for the scope.
    """
    if backend is None and _PINNED.get() is not None:
        yield _PINNED.get()
        return
    value = kernel_backend() if backend is None else _checked(backend, "backend")
    token = _PINNED.set(value)
    try:
        yield value
    finally:
        _PINNED.reset(token)


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
            bias: torch.Tensor | None = None, *, workspace=None) -> torch.Tensor:
    """y = x·Wᵀ + bias with W stored quantized (`QuantizedLinear`'s layouts: int8 / fp8 / int4).

    The Triton dequant-matmul with KREA2_LITE_KERNELS=triton when it supports the input;
    otherwise `qmatmul_torch` (dequantize to x.dtype, then `F.linear`). `workspace` (a
    `KernelWorkspace`, or None) lends the reused dequantization buffer of the CUDA `auto` path.
    """
    from .qmatmul_torch import qmatmul_torch

    # Not yet compiled and timed on a GPU: `auto` keeps the torch path until it has been; the
    # kernel runs when asked for explicitly (KREA2_LITE_KERNELS=triton), or on a GPU whose
    # measured table (kernels/tuning.json) says Triton wins at this token count.
    backend = kernel_backend()
    if backend == "auto" and auto_choice("qmatmul", dtype, x) == "triton":
        backend = "triton"
    if backend == "auto" and x.is_cuda:
        log_fallback("qmatmul", "auto keeps dequantize + cuBLAS on CUDA (the Triton dequant-matmul is not yet "
                     "validated on a GPU; KREA2_LITE_KERNELS=triton forces it)")
        if dtype in ("int8", "fp8") and scale.dtype == x.dtype:
            buffer = _scratch(workspace, x, out_features * in_features)
            if buffer is not None:
                from .qmatmul_torch import qmatmul_scratch

                return qmatmul_scratch(x, qdata, scale, dtype, out_features, in_features, bias, buffer)
    if backend == "triton" and use_triton("qmatmul", x, qdata):
        from .qmatmul_triton import qmatmul_supports, qmatmul_triton

        reason = qmatmul_supports(x, qdata, scale, shift, dtype, group, out_features, in_features, bias)
        if reason is None:
            return qmatmul_triton(x, qdata, scale, shift, dtype, group, out_features, in_features, bias)
        log_fallback("qmatmul", reason)
    return qmatmul_torch(x, qdata, scale, shift, dtype, group, out_features, in_features, bias)


def gguf_linear(x: torch.Tensor, qdata: torch.Tensor, qtype: str, out_features: int, in_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + bias with W stored as GGUF blocks (`GGUFLinear`). The Triton dequant-matmul
    (`gguf_triton`, Q8_0 and Q4_K) with KREA2_LITE_KERNELS=triton or where the tuning table says it
    wins; otherwise `gguf_linear_torch` (dequantize the layer in fp32 on its device, then `F.linear`).
    Like `qmatmul`, `auto` keeps the torch path until the kernel has been validated on a GPU."""
    from .gguf_dequant_torch import gguf_linear_torch

    backend = kernel_backend()
    if backend == "auto" and auto_choice("gguf_linear", qtype, x) == "triton":
        backend = "triton"
    if backend == "triton" and use_triton("gguf_linear", x, qdata):
        from .gguf_triton import gguf_matmul_supports, gguf_matmul_triton

        reason = gguf_matmul_supports(x, qdata, qtype, out_features, in_features, bias)
        if reason is None:
            return gguf_matmul_triton(x, qdata, qtype, out_features, in_features, bias)
        log_fallback("gguf_linear", reason)
    return gguf_linear_torch(x, qdata, qtype, out_features, in_features, bias)


# Token counts from which dequantize-to-x.dtype + cuBLAS beats the int8 GEMM, per GPU capability
# (major, minor). Fill from `benchmarks/bench_kernels.py` runs; absent = never.
DEQUANT_MIN_TOKENS: dict[tuple[int, int], int] = {}


def dequant_min_tokens(device: torch.device) -> int | None:
    """The token count from which `auto` takes `dequant_matmul` on this CUDA device (None = never);
    the one place the per-GPU table is consulted."""
    return DEQUANT_MIN_TOKENS.get(torch.cuda.get_device_capability(device))


def _scratch(workspace, x: torch.Tensor, numel: int) -> torch.Tensor | None:
    """The workspace's reused weight buffer for x's device and dtype, or None without a workspace."""
    return None if workspace is None else workspace.scratch(x.device, x.dtype, numel)


def _quantized_activation(x: torch.Tensor, x2: torch.Tensor, act: str, rotate: int, use_kernel: bool,
                          workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq, sx) of x per token; inside `workspace.sharing(x)` computed once for all its layers."""
    from .act_quant_torch import act_quant_torch

    def quantize() -> tuple[torch.Tensor, torch.Tensor]:
        if use_kernel:
            from .act_quant_triton import act_quant_supports, act_quant_triton

            reason = act_quant_supports(x2, act, rotate)
            if reason is None:
                return act_quant_triton(x2, act, rotate)
            log_fallback("act_quant", reason)
        return act_quant_torch(x2, act, rotate)

    if workspace is None:
        return quantize()
    return workspace.shared_activation(x, (act, rotate, use_kernel), quantize)


def _fused_glu_activation(gate: torch.Tensor, up: torch.Tensor, act: str,
                          rotate: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """silu(gate)·up quantized by the Triton kernel without writing the product, or None."""
    from .act_quant_triton import act_quant_supports, act_quant_triton

    reason = act_quant_supports(gate, act, rotate, up)
    if reason is not None:
        log_fallback("act_quant (SwiGLU fused)", reason)
        return None
    return act_quant_triton(gate, act, rotate, up=up)


def w8a8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                act: str, rotate: int = 0, up: torch.Tensor | None = None, *, workspace=None) -> torch.Tensor:
    """y = x·Wᵀ + bias for a W8A8 layer: x (..., K) in bf16/fp16/fp32 → (..., N) in x.dtype.

    qdata (N, K) int8 or float8_e4m3fn and scale (N, 1) are the stored weight (W·H when rotate > 0,
    H the block Hadamard of size `rotate`); `act` ("int8" | "fp8") is the activation type, quantized
    per token on the fly (after the same rotation). With `up` (like x), the layer's input is the
    SwiGLU product silu(x)·up, formed in x.dtype; the Triton quantizer fuses it (the product is never
    written), every other path forms it first. `workspace` (a `KernelWorkspace`, or None) shares the
    quantized activation within its `sharing(x)` scope and lends the dequantization scratch.
    Backend choice: see the module docstring.
    """
    from .w8a8_torch import (dequant_matmul, scaled_mm_fp8, scaled_mm_reason, w8a8_matmul_dequant,
                             w8a8_matmul_torch)

    backend = kernel_backend()
    tuned = auto_choice("w8a8", act, x) if backend == "auto" else None  # the GPU's measured table
    backend = "triton" if tuned == "triton" else backend
    N, K = qdata.shape
    forced = backend == "triton"
    fused = None
    if up is not None:
        if forced and use_triton("act_quant", x, up):
            fused = _fused_glu_activation(x, up, act, rotate)
        if fused is None:
            x, up = F.silu(x) * up, None
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    lead = x.shape[:-1]
    reference = backend == "torch" or (backend == "auto" and not x.is_cuda)

    if x.is_cuda and not forced and not reference:
        threshold = dequant_min_tokens(x.device)
        if (threshold is not None and M >= threshold) or tuned == "dequant":
            return dequant_matmul(x, qdata, scale, bias, act, rotate, _scratch(workspace, x, N * K))
        log_fallback("w8a8_linear", "auto on CUDA uses the torch activation quantizer and torch._int_mm / "
                     "torch._scaled_mm (the Triton W8A8 kernels are not yet validated on a GPU; "
                     "KREA2_LITE_KERNELS=triton forces them)")

    use_kernel = forced and use_triton("act_quant", x)
    xq, sx = fused if fused is not None else _quantized_activation(x, x2, act, rotate, use_kernel, workspace)
    if reference:  # `w8a8_linear_torch` in two steps, so that a shared activation is quantized once
        return w8a8_matmul_torch(xq, sx, qdata, scale, bias, x.dtype).reshape(*lead, N)

    if act == "int8":
        if forced and use_triton("w8a8_int8", x):
            from .w8a8_triton import w8a8_matmul_triton, w8a8_supports

            reason = w8a8_supports(xq, sx, qdata, scale, bias, x.dtype)
            if reason is None:
                return w8a8_matmul_triton(xq, sx, qdata, scale, bias, x.dtype).reshape(*lead, N)
            log_fallback("w8a8_int8", reason)
        return w8a8_matmul_torch(xq, sx, qdata, scale, bias, x.dtype).reshape(*lead, N)

    if x.is_cuda and scaled_mm_reason(xq, qdata) is None:
        try:
            return scaled_mm_fp8(xq, sx, qdata, scale, bias, x.dtype).reshape(*lead, N)
        except RuntimeError as exc:  # e.g. a torch build without row-wise fp8 scaling for this GPU
            log_fallback("w8a8_fp8", f"torch._scaled_mm failed ({str(exc).splitlines()[0][:120]}); "
                         "dequantized operands through one cuBLAS GEMM instead")
    if x.is_cuda:
        if scaled_mm_reason(xq, qdata) is not None:
            log_fallback("w8a8_fp8", f"{scaled_mm_reason(xq, qdata)}; dequantized operands through one "
                         "cuBLAS GEMM instead")
        return w8a8_matmul_dequant(xq, sx, qdata, scale, bias, x.dtype,
                                   _scratch(workspace, x, N * K)).reshape(*lead, N)
    log_fallback("w8a8_fp8", "fp8 W8A8 has no Triton GEMM; torch._scaled_mm needs CUDA sm_89+ "
                 "(using the torch reference GEMM)")
    return w8a8_matmul_torch(xq, sx, qdata, scale, bias, x.dtype).reshape(*lead, N)
