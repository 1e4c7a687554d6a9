"""Triton per-token dynamic activation quantizer, with the block Hadamard rotation fused in.

Same result as `act_quant_torch` (see there for the semantics): one program per BLOCK_M rows
makes two passes over K — the row absmax, then quantize and store — rotating each length-b
slice in registers (a `tl.dot` with the ±1 Hadamard matrix, then ·1/√b) in both passes, so
the rotated activation never goes to memory.

Bit-exact choices (the reference does the same fp32 operations in the same order):
* x / scale uses `div_rn` (IEEE division; Triton's `/` is approximate on GPUs);
* rounding to int8 is round-half-even built from `floor` (libdevice `rint` fails under the
  interpreter);
* fp8 codes are computed with integer ops and stored as uint8 bits (RTNE, subnormals included):
  the interpreter's fp32→fp8 cast is wrong, and GPUs below sm_89 have no fp8 type.
On a GPU the rotation dot takes bf16/fp16 activations and the ±1 matrix in that dtype (exact
products, fp32 accumulation); under the interpreter both are fp32 (its bf16 arithmetic is wrong).
The rotated sums may then differ from torch's in the last fp32 bit (summation order), which can
move a value sitting on a rounding boundary by one code.

SwiGLU fusion (`up` given): the tile quantized is silu(gate)·up, rounded to the activation dtype
after the silu and after the product, as the model's `F.silu(gate) * up` does; gate and up are
read (twice, like x) and the product is never written. silu is x / (1 + exp(−x)); exp differs
from torch's in the last bit now and then, so a code can move by one there too.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .act_quant_torch import ACT_QUANT_DTYPES, QMAX, ROTATE_SIZES, hadamard_matrix
from .attention_triton import INTERPRETED, _dot_operand, _round_to, device_reason
from .configs import act_quant_configs, autotuned, capability

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET_CONFIG = dict(BLOCK_M=16)
PLAIN_BLOCK_K = 128  # K tile without rotation (any K: masked tail)


@triton.jit
def _rtne(v):
    """Nearest integer, ties to even (torch.round), for |v| < 2^23; fp32 in and out."""
    f = tl.floor(v)
    d = v - f  # exact
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _e4m3_bits(v):
    """fp32 v, |v| ≤ 448 → the uint8 bits of float8_e4m3fn, round to nearest even (torch's cast)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    a = mag.to(tl.float32, bitcast=True)
    # Normal range: keep 3 mantissa bits (RTNE; a carry bumps the exponent), re-bias 127 → 7.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal range (a < 2^-6): multiples of 2^-9; 8·2^-9 = 2^-6 is code 8, the first normal.
    sub = _rtne(a * 512.0).to(tl.int32)
    code = tl.where(a >= 0.015625, normal, sub)
    return (code | sign).to(tl.uint8)


@triton.jit
def _row_tile(rows, up_rows, h, offs_k, m_ok, K, s_xk, inv_sqrt,
              ROTATE: tl.constexpr, GLU: tl.constexpr, DT: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BIT_ROUND: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_K) tile of x (GLU: of silu(x)·up), rotated when ROTATE; zeros outside."""
    ok = m_ok[:, None] & (offs_k[None, :] < K)
    x = tl.load(rows + offs_k[None, :] * s_xk, mask=ok, other=0.0).to(tl.float32)
    if GLU:
        u = tl.load(up_rows + offs_k[None, :] * s_xk, mask=ok, other=0.0).to(tl.float32)
        silu = _round_to(tl.math.div_rn(x, 1.0 + tl.exp(-x)), DT, BIT_ROUND)
        x = _round_to(silu * u, DT, BIT_ROUND)
    if ROTATE:
        x = tl.dot(_dot_operand(x, DT, DOT_IN_INPUT_DTYPE), h, input_precision=DOT_PRECISION) * inv_sqrt
    return x


@triton.jit
def _act_quant_kernel(
    X, U, H, Q, S, M, K, s_xm, s_xk, s_qm, inv_sqrt,
    QMAX: tl.constexpr, FP8: tl.constexpr, ROTATE: tl.constexpr, GLU: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BIT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    DT: tl.constexpr = X.dtype.element_ty
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = X + offs_m.to(tl.int64)[:, None] * s_xm
    up_rows = U + offs_m.to(tl.int64)[:, None] * s_xm
    h = None
    if ROTATE:
        hk = tl.arange(0, BLOCK_K)
        h = _dot_operand(tl.load(H + hk[:, None] * BLOCK_K + hk[None, :]), DT, DOT_IN_INPUT_DTYPE)
    amax = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        v = _row_tile(rows, up_rows, h, offs_k, m_ok, K, s_xk, inv_sqrt, ROTATE, GLU, DT, DOT_IN_INPUT_DTYPE,
                      DOT_PRECISION, BIT_ROUND)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    scale = tl.where(amax > 0.0, tl.math.div_rn(amax, QMAX), 1.0)
    tl.store(S + offs_m, scale, mask=m_ok)
    q_rows = Q + offs_m.to(tl.int64)[:, None] * s_qm
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        v = _row_tile(rows, up_rows, h, offs_k, m_ok, K, s_xk, inv_sqrt, ROTATE, GLU, DT, DOT_IN_INPUT_DTYPE,
                      DOT_PRECISION, BIT_ROUND)
        v = tl.math.div_rn(v, scale[:, None])
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if FP8:
            q = _e4m3_bits(v)
        else:
            q = _rtne(v).to(tl.int8)
        tl.store(q_rows + offs_k[None, :], q, mask=m_ok[:, None] & (offs_k[None, :] < K))


def act_quant_supports(x: torch.Tensor, dtype: str = "int8", rotate: int = 0,
                       up: torch.Tensor | None = None) -> str | None:
    """None if `act_quant_triton` handles these inputs, else a short reason why not."""
    if up is not None:
        if up.shape != x.shape or up.dtype != x.dtype:
            return f"up {tuple(up.shape)} {up.dtype} does not match x {tuple(x.shape)} {x.dtype}"
        K = x.shape[-1]
        if x.reshape(-1, K).stride() != up.reshape(-1, K).stride():
            return "fused SwiGLU input needs gate and up with the same strides"
    if dtype not in ACT_QUANT_DTYPES:
        return f"activation quant dtype {dtype!r} not in {ACT_QUANT_DTYPES}"
    if x.dtype not in ACT_DTYPES:
        return f"activation dtype {x.dtype} (need fp16/bf16/fp32)"
    if x.dim() < 1 or x.shape[-1] == 0:
        return f"x shape {tuple(x.shape)} has no features"
    if rotate:
        if rotate not in ROTATE_SIZES:
            return f"rotation block {rotate} not in {ROTATE_SIZES}"
        if x.shape[-1] % rotate:
            return f"rotation block {rotate} does not divide K={x.shape[-1]}"
    return device_reason(x) if up is None else device_reason(x, up)


def act_quant_triton(x: torch.Tensor, dtype: str = "int8", rotate: int = 0,
                     up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) → (q (M, K) int8 | float8_e4m3fn, scale (M, 1) fp32); see `act_quant_torch`.
    With `up` (shaped and strided like x): quantizes silu(x)·up without writing the product."""
    reason = act_quant_supports(x, dtype, rotate, up)
    if reason is not None:
        raise ValueError(f"act_quant_triton: {reason}")
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=torch.uint8 if dtype == "fp8" else torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M:
        on_gpu = x.is_cuda and not INTERPRETED
        h = hadamard_matrix(rotate, normalized=False, device=x.device) if rotate else scale
        args = (x2, x2 if up is None else up.reshape(-1, K), h, q, scale, M, K, x2.stride(0), x2.stride(1), q.stride(0),
                1.0 / math.sqrt(rotate) if rotate else 1.0)
        flags = dict(QMAX=QMAX[dtype], FP8=dtype == "fp8", ROTATE=bool(rotate), GLU=up is not None,
                     BIT_ROUND=not on_gpu,
                     DOT_IN_INPUT_DTYPE=on_gpu and x.dtype != torch.float32,
                     # fp32 rotation dots must stay exact (TF32 would round x to 10 bits); bf16/fp16
                     # operands ignore the setting (as in `attention_triton.launch_options`).
                     DOT_PRECISION="ieee" if (x.dtype == torch.float32 or not on_gpu) else "tf32",
                     BLOCK_K=rotate or PLAIN_BLOCK_K)
        if on_gpu:
            tuned = autotuned(_act_quant_kernel, act_quant_configs, capability(x.device),
                              ("K", "ROTATE", "FP8", "GLU"))
            tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](*args, **flags)
        else:
            _act_quant_kernel[(triton.cdiv(M, INTERPRET_CONFIG["BLOCK_M"]),)](*args, **flags, **INTERPRET_CONFIG)
    if dtype == "fp8":
        q = q.view(torch.float8_e4m3fn)
    return q, scale
