"""Fused Krea 2 attention in Triton: q/k RMSNorm + RoPE, GQA flash attention, sigmoid gate.

Same result as `fused_attention_torch` (see there for the exact semantics and op order), but
the normalised/rotated queries and the attention output never round-trip through memory:

* prologue: each program loads its Q tile as even/odd halves (pairs 2i, 2i+1), RMS-normalises
  it, rotates it and keeps it in registers;
* keys: a small Triton kernel (`_k_prep_kernel`, one launch over the Hkv heads only, so
  1/GROUP of the query work) normalises + rotates K once and writes it de-interleaved per head
  ([evens | odds]) to a (B, Hkv, L, D) buffer, so the flash loop reads two contiguous halves.
  (Normalising each K tile inside the flash loop instead was measured 7x slower on an H100:
  the work repeats for every Q tile and the stride-2 loads + transposes defeat pipelining.)
* q·k = q_even·k_even + q_odd·k_odd, so the pair layout never has to be re-interleaved;
* epilogue: the normalised output is multiplied by sigmoid(gate) and written once to
  (B, L, H*D), column h*D + d.

Rows whose keys are all masked produce zeros. Intermediate roundings to the input dtype
(after the norm, after RoPE, the attention output) match the torch reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_triton import (GPU_CONFIGS, INTERPRET_BLOCK_N, INTERPRETED, LOG2E, SUPPORTED_DTYPES,
                        SUPPORTED_HEAD_DIMS, _attn_tile, _dot_operand, _finish, _round_to, device_reason,
                        key_mask_reason, launch, launch_options, mask_args)


@triton.jit
def _load_norm_rope(base, offs_l, s_l, s_d, row_ok, Scale, Cos, s_cl, s_cd, Sin, s_sl, s_sd, eps,
                    DTYPE: tl.constexpr, BIT_ROUND: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows offs_l of one head: (x_even, x_odd) after RMSNorm*(1+scale) and RoPE, fp32 tiles
    of shape (rows, HEAD_DIM//2) holding values rounded like the torch reference."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, HALF)
    ptrs = base + offs_l[:, None] * s_l + (2 * offs_h)[None, :] * s_d
    xe = tl.load(ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    xo = tl.load(ptrs + s_d, mask=row_ok[:, None], other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(xe * xe, 1) + tl.sum(xo * xo, 1)) / HEAD_DIM + eps)
    se = 1.0 + tl.load(Scale + 2 * offs_h).to(tl.float32)
    so = 1.0 + tl.load(Scale + 2 * offs_h + 1).to(tl.float32)
    xe = _round_to(xe * r[:, None] * se[None, :], DTYPE, BIT_ROUND)
    xo = _round_to(xo * r[:, None] * so[None, :], DTYPE, BIT_ROUND)
    c = tl.load(Cos + offs_l[:, None] * s_cl + offs_h[None, :] * s_cd, mask=row_ok[:, None], other=0.0)
    s = tl.load(Sin + offs_l[:, None] * s_sl + offs_h[None, :] * s_sd, mask=row_ok[:, None], other=0.0)
    c = c.to(tl.float32)
    s = s.to(tl.float32)
    ye = _round_to(c * xe - s * xo, DTYPE, BIT_ROUND)
    yo = _round_to(s * xe + c * xo, DTYPE, BIT_ROUND)
    return ye, yo


@triton.jit
def _k_prep_kernel(K, Scale, Cos, Sin, KP, s_kb, s_kl, s_kh, s_kd, s_cb, s_cl, s_cd, s_sb, s_sl, s_sd,
                   Hkv, L, eps, HEAD_DIM: tl.constexpr, BIT_ROUND: tl.constexpr, BLOCK: tl.constexpr):
    """KP (B, Hkv, L, D) contiguous, each row stored as [rotated evens | rotated odds]."""
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    ke, ko = _load_norm_rope(K + b * s_kb + hk * s_kh, offs, s_kl, s_kd, ok, Scale, Cos + b * s_cb, s_cl, s_cd,
                             Sin + b * s_sb, s_sl, s_sd, eps, KP.dtype.element_ty, BIT_ROUND, HEAD_DIM)
    HALF: tl.constexpr = HEAD_DIM // 2
    ptrs = KP + pid_bh * L * HEAD_DIM + offs[:, None] * HEAD_DIM + tl.arange(0, HALF)[None, :]
    tl.store(ptrs, ke.to(KP.dtype.element_ty), mask=ok[:, None])
    tl.store(ptrs + HALF, ko.to(KP.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _fused_attn_kernel(
    Q, KP, V, QScale, Cos, Sin, Gate, Mask, O,
    s_qb, s_ql, s_qh, s_qd,
    s_vb, s_vl, s_vh, s_vd,
    s_cb, s_cl, s_cd, s_sb, s_sl, s_sd,
    s_gb, s_gl, s_gc,
    s_mb, s_ml,
    H, L, GROUP, qk_scale, eps,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BIT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    DT: tl.constexpr = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    qe, qo = _load_norm_rope(Q + b * s_qb + h * s_qh, offs_m, s_ql, s_qd, row_ok, QScale, Cos + b * s_cb,
                             s_cl, s_cd, Sin + b * s_sb, s_sl, s_sd, eps, DT, BIT_ROUND, HEAD_DIM)
    qe = _dot_operand(qe, DT, DOT_IN_INPUT_DTYPE)
    qo = _dot_operand(qo, DT, DOT_IN_INPUT_DTYPE)

    k_base = KP + (b * (H // GROUP) + hk) * L * HEAD_DIM  # prepped K: rows of [evens | odds]
    v_base = V + b * s_vb + hk * s_vh
    mask_ptr = Mask + b * s_mb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _attn_tile(qe, qo, k_base, HEAD_DIM, 1, v_base, s_vl, s_vd, mask_ptr, s_ml, start_n, L,
                                   m_i, l_i, acc, qk_scale, DT, HEAD_DIM, BLOCK_N, HAS_MASK, True, True,
                                   DOT_IN_INPUT_DTYPE, DOT_PRECISION)
    if n_full < L:  # ragged last tile
        m_i, l_i, acc = _attn_tile(qe, qo, k_base, HEAD_DIM, 1, v_base, s_vl, s_vd, mask_ptr, s_ml, n_full, L,
                                   m_i, l_i, acc, qk_scale, DT, HEAD_DIM, BLOCK_N, HAS_MASK, False, True,
                                   DOT_IN_INPUT_DTYPE, DOT_PRECISION)

    # epilogue: round like the reference's attention output, gate in fp32, write (B, L, H*D) once
    o = _round_to(_finish(acc, l_i), DT, BIT_ROUND)
    cols = h * HEAD_DIM + offs_d
    g = tl.load(Gate + b * s_gb + offs_m[:, None] * s_gl + cols[None, :] * s_gc,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    out = _round_to(o * (1.0 / (1.0 + tl.exp(-g))), DT, BIT_ROUND)
    o_ptrs = O + b * L * H * HEAD_DIM + offs_m[:, None] * (H * HEAD_DIM) + cols[None, :]
    tl.store(o_ptrs, out.to(DT), mask=row_ok[:, None])


_fused_attn_tuned = None if INTERPRETED else triton.autotune(
    configs=GPU_CONFIGS, key=["L", "HEAD_DIM", "GROUP"])(_fused_attn_kernel)


def fused_supports(q, k, v, q_scale, k_scale, cos, sin, gate, key_mask=None, eps=1e-5) -> str | None:
    """None if `fused_attention` handles these inputs, else a short reason why not."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, L, H, D)"
    B, L, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != L or k.shape[3] != D:
        return f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} as (B, L, Hkv, D)"
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        return f"query heads {H} are not a multiple of KV heads {Hkv}"
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head dim {D} not in {SUPPORTED_HEAD_DIMS}"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype} k={k.dtype} v={v.dtype} (need one of fp16/bf16/fp32 for all)"
    for name, t in (("q_scale", q_scale), ("k_scale", k_scale)):
        if tuple(t.shape) != (D,) or not t.is_floating_point():
            return f"{name} must be a float tensor of shape ({D},), got {tuple(t.shape)} {t.dtype}"
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (L, D // 2):
        return f"cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} are not (B or 1, L, D//2) = (1|{B}, {L}, {D // 2})"
    if not (cos.is_floating_point() and sin.is_floating_point()) or cos.dtype != sin.dtype:
        return f"cos/sin dtypes {cos.dtype}/{sin.dtype} must be one float dtype"
    if tuple(gate.shape) != (B, L, H * D) or not gate.is_floating_point():
        return f"gate {tuple(gate.shape)} {gate.dtype} is not a float (B, L, H*D) = {(B, L, H * D)}"
    extra = [] if key_mask is None else [key_mask]
    return key_mask_reason(key_mask, B, L) or device_reason(q, k, v, q_scale, k_scale, cos, sin, gate, *extra)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_scale: torch.Tensor, k_scale: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, gate: torch.Tensor,
                    key_mask: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Triton version of `fused_attention_torch` (same arguments, result (B, L, H*D) in q's dtype).

    Raises ValueError on inputs `fused_supports` declines.
    """
    reason = fused_supports(q, k, v, q_scale, k_scale, cos, sin, gate, key_mask, eps)
    if reason is not None:
        raise ValueError(f"fused_attention: {reason}")
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    out = torch.empty((B, L, H * D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    # A batch-1 rope table is broadcast over the batch with a zero batch stride.
    cos_s = (cos.stride(0) if cos.shape[0] == B else 0, cos.stride(1), cos.stride(2))
    sin_s = (sin.stride(0) if sin.shape[0] == B else 0, sin.stride(1), sin.stride(2))
    opts = launch_options(q)
    kp = torch.empty((B, Hkv, L, D), dtype=q.dtype, device=q.device)
    block = 64 if (q.is_cuda and not INTERPRETED) else INTERPRET_BLOCK_N
    _k_prep_kernel[(triton.cdiv(L, block), B * Hkv)](
        k, k_scale, cos, sin, kp, *k.stride(), *cos_s, *sin_s, Hkv, L, eps,
        HEAD_DIM=D, BIT_ROUND=opts["BIT_ROUND"], BLOCK=block)
    m, s_mb, s_ml = mask_args(key_mask, q)
    args = (q, kp, v, q_scale, cos, sin, gate, m, out, *q.stride(), *v.stride(), *cos_s, *sin_s,
            *gate.stride(), s_mb, s_ml, H, L, H // Hkv, LOG2E / math.sqrt(D), eps)
    flags = dict(HEAD_DIM=D, HAS_MASK=key_mask is not None, **opts)
    launch(_fused_attn_kernel, _fused_attn_tuned, q.is_cuda, L, B * H, args, flags)
    return out
