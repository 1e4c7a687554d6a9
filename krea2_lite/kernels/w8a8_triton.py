"""Triton W8A8 int8 GEMM: y (M, N) = xq (M, K) int8 · wq (N, K)ᵀ int8 → int32, then the epilogue
acc · sx[m] · sw[n] + bias[n] in fp32, stored in the activation dtype.

Same result as `w8a8_matmul_torch` for int8 operands: the int32 accumulation is exact, and the
epilogue does the reference's fp32 operations in its order (under the interpreter bf16 rounding
of the output uses the round-to-nearest-even bit trick, as in `qmatmul_triton`). On a GPU the
compiler may fuse the last multiply-add into an FMA (one rounding fewer): ≤ 1 ulp of fp32.

Programs walk the output in GROUP_M-row super-tiles (Triton tutorial 03) so that consecutive
programs share weight tiles in L2. Any M (ragged last tile), K (masked tail), N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_triton import INTERPRETED, _round_to, device_reason
from .configs import autotuned, capability, w8a8_configs

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Under the interpreter: fixed tiles (dot dims ≥ 16; int8 MMAs want BLOCK_K ≥ 32), no autotuning.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=4)


@triton.jit
def _w8a8_kernel(
    X, W, SX, SW, B, Y,
    M, N, K, M_BUCKET,
    s_xm, s_wn, s_sw, s_ym, s_yn,
    HAS_BIAS: tl.constexpr, BIT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    DT: tl.constexpr = Y.dtype.element_ty
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * s_xm
    w_cols = W + offs_n.to(tl.int64)[None, :] * s_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(a, b, acc)
    sx = tl.load(SX + offs_m, mask=m_ok, other=0.0)
    sw = tl.load(SW + offs_n * s_sw, mask=n_ok, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * sx[:, None]
    out = out * sw[None, :]
    if HAS_BIAS:
        out = out + tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = _round_to(out, DT, BIT_ROUND)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :] * s_yn
    tl.store(y_ptrs, out.to(DT), mask=m_ok[:, None] & n_ok[None, :])


def w8a8_supports(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> str | None:
    """None if `w8a8_matmul_triton` handles these inputs, else a short reason why not."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        return f"operands {xq.dtype} / {wq.dtype} are not both int8"
    if out_dtype not in OUT_DTYPES:
        return f"output dtype {out_dtype} (need fp16/bf16/fp32)"
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        return f"shapes {tuple(xq.shape)} · {tuple(wq.shape)}ᵀ do not match"
    M, K = xq.shape
    N = wq.shape[0]
    if xq.stride(1) != 1 or wq.stride(1) != 1:
        return "operands are not contiguous along K"
    if tuple(sx.shape) != (M, 1) or sx.dtype != torch.float32 or not sx.is_contiguous():
        return f"sx must be contiguous fp32 ({M}, 1), got {tuple(sx.shape)} {sx.dtype}"
    if sw.numel() != N or sw.dim() != 2 or not sw.is_floating_point():
        return f"sw must be floating ({N}, 1), got {tuple(sw.shape)} {sw.dtype}"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N or not bias.is_contiguous()):
        return f"bias shape {tuple(bias.shape)} is not contiguous ({N},)"
    return device_reason(*([xq, sx, wq, sw] + ([] if bias is None else [bias])))


def w8a8_matmul_triton(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(xq·sx)(wq·sw)ᵀ + bias → (M, N) out_dtype; int8 operands. See `w8a8_matmul_torch`."""
    reason = w8a8_supports(xq, sx, wq, sw, bias, out_dtype)
    if reason is not None:
        raise ValueError(f"w8a8_matmul_triton: {reason}")
    M, K = xq.shape
    N = wq.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(out_dtype)
        return y
    on_gpu = xq.is_cuda and not INTERPRETED
    args = (xq, wq, sx, sw, bias if bias is not None else sw, y, M, N, K, min(triton.next_power_of_2(M), 4096),
            xq.stride(0), wq.stride(0), sw.stride(0), y.stride(0), y.stride(1))
    flags = dict(HAS_BIAS=bias is not None, BIT_ROUND=not on_gpu)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if on_gpu:
        tuned = autotuned(_w8a8_kernel, w8a8_configs, capability(xq.device), ("M_BUCKET", "N", "K"))
        tuned[grid](*args, **flags)
    else:
        _w8a8_kernel[grid(INTERPRET_CONFIG)](*args, **flags, **INTERPRET_CONFIG)
    return y
