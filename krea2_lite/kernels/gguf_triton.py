"""Triton dequant-matmul for GGUF Q8_0 and Q4_K: y (M, N) = x (M, K) · Wᵀ + bias, W read from its
stored blocks (uint8 (N, row bytes), one row of blocks per output feature) and dequantized tile by
tile in registers, as `gguf_dequant_torch` does it (fp32 arithmetic, then rounded to the activation
dtype); fp32 accumulation, bias fused.

  Q8_0  34-byte blocks of 32: fp16 d, then 32 int8 q;                     w = d·q
  Q4_K  144-byte blocks of 256: fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes
        of nibbles (each 64-element run: 32 low nibbles, then the 32 high ones); w = (d·sc)·q − dmin·m

fp16 scales are assembled from their two bytes and bitcast, so no fp16 load alignment is needed.
Interpreter vs GPU as in `qmatmul_triton` (fp32 after every load; `_round_to` emulates the cast).
On a GPU the compiler may contract (d·sc)·q − dmin·m into an FMA: equal to the reference to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_triton import INTERPRETED, _dot_operand, _round_to, device_reason

GGUF_KERNEL_TYPES = {"Q8_0": (0, 32, 34), "Q4_K": (1, 256, 144)}  # kind, elements per block, bytes per block
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64)
GPU_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4)


@triton.jit
def _f16_at(ptr, mask):
    """The little-endian float16 at byte pointers `ptr`, as fp32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _gguf_tile(Q, offs_n, offs_k, N, K, row_bytes, KIND: tl.constexpr):
    """Dequantized fp32 Wᵀ tile (BLOCK_K, BLOCK_N); zeros outside [0, K) x [0, N)."""
    ok = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    rows = Q + offs_n.to(tl.int64)[None, :] * row_bytes
    if KIND == 0:  # Q8_0
        block = rows + (offs_k[:, None] // 32) * 34
        d = _f16_at(block, ok)
        q = tl.load(block + 2 + offs_k[:, None] % 32, mask=ok, other=0).to(tl.int8).to(tl.float32)
        w = q * d
    else:  # Q4_K
        block = rows + (offs_k[:, None] // 256) * 144
        j = offs_k[:, None] % 256
        sub = j // 32  # which of the 8 scale / min pairs
        low = sub < 4
        i = sub % 4
        a = _byte(block + 4 + i, ok)   # scale bytes 0..3
        b = _byte(block + 8 + i, ok)   # min bytes 0..3
        c = _byte(block + 12 + i, ok)  # high halves
        sc = tl.where(low, a & 63, (c & 0xF) | ((a >> 2) & 0x30)).to(tl.float32)
        mn = tl.where(low, b & 63, (c >> 4) | ((b >> 2) & 0x30)).to(tl.float32)
        packed = _byte(block + 16 + (j // 64) * 32 + j % 32, ok)
        q = tl.where((j % 64) < 32, packed & 0xF, packed >> 4).to(tl.float32)
        d = _f16_at(block, ok) * sc
        dm = _f16_at(block + 2, ok) * mn
        w = d * q - dm
    return tl.where(ok, w, 0.0)


@triton.jit
def _gguf_matmul_kernel(
    X, Q, B, Y, M, N, K, row_bytes, s_xm, s_xk, s_ym, s_yn,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BIT_ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    DT: tl.constexpr = X.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    x_rows = X + offs_m.to(tl.int64)[:, None] * s_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * s_xk, mask=m_ok[:, None] & (offs_k[None, :] < K),
                    other=0.0).to(tl.float32)
        w = _round_to(_gguf_tile(Q, offs_n, offs_k, N, K, row_bytes, KIND), DT, BIT_ROUND)
        acc = tl.dot(_dot_operand(x, DT, DOT_IN_INPUT_DTYPE), _dot_operand(w, DT, DOT_IN_INPUT_DTYPE), acc,
                     input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += _round_to(tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32), DT, BIT_ROUND)[None, :]
    out = _round_to(acc, DT, BIT_ROUND)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :] * s_yn
    tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=m_ok[:, None] & (offs_n[None, :] < N))


def gguf_matmul_supports(x: torch.Tensor, qdata: torch.Tensor, qtype: str, out_features: int, in_features: int,
                         bias: torch.Tensor | None = None) -> str | None:
    """None if `gguf_matmul_triton` handles these inputs, else a short reason why not."""
    if qtype not in GGUF_KERNEL_TYPES:
        return f"GGUF type {qtype} has no Triton kernel (Q8_0 and Q4_K do)"
    _, block, size = GGUF_KERNEL_TYPES[qtype]
    if x.dtype not in ACT_DTYPES or x.shape[-1] != in_features or in_features % block:
        return f"x {tuple(x.shape)} {x.dtype} does not fit in_features={in_features} of {qtype}"
    if qdata.dtype != torch.uint8 or tuple(qdata.shape) != (out_features, in_features // block * size) \
            or not qdata.is_contiguous():
        return f"qdata {tuple(qdata.shape)} {qdata.dtype} is not the contiguous uint8 blocks of {qtype}"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features or not bias.is_contiguous()):
        return f"bias shape {tuple(bias.shape)} is not contiguous ({out_features},)"
    return device_reason(x, qdata, *([] if bias is None else [bias]))


def gguf_matmul_triton(x: torch.Tensor, qdata: torch.Tensor, qtype: str, out_features: int, in_features: int,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + bias with W in GGUF blocks; x (..., in) → (..., out) in x.dtype (see `gguf_linear_torch`)."""
    reason = gguf_matmul_supports(x, qdata, qtype, out_features, in_features, bias)
    if reason is not None:
        raise ValueError(f"gguf_matmul_triton: {reason}")
    N, K = out_features, in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    on_gpu = x.is_cuda and not INTERPRETED
    cfg = dict(GPU_CONFIG if on_gpu else INTERPRET_CONFIG)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _gguf_matmul_kernel[grid](
        x2, qdata, bias if bias is not None else x2, y, M, N, K, qdata.shape[1],
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        KIND=GGUF_KERNEL_TYPES[qtype][0], HAS_BIAS=bias is not None, DOT_IN_INPUT_DTYPE=on_gpu,
        DOT_PRECISION="ieee" if (x.dtype == torch.float32 or not on_gpu) else "tf32", BIT_ROUND=not on_gpu, **cfg)
    return y.reshape(*lead, N)
