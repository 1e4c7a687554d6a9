"""Triton flash-attention forward with grouped-query heads and a key-padding mask.

`attention_triton(q, k, v, key_mask)` has the semantics of `attention_torch` (SDPA with
`enable_gqa` and a (B, 1, 1, L) key mask) except for one documented difference:

* a query row whose keys are ALL masked returns zeros (SDPA returns NaN there).

Design: one program per (query tile, batch*head). Query head h reads KV head h // (H // Hkv)
through pointer arithmetic, so repeated K/V are never materialised. Every tensor is addressed
through its strides (transposed views need no copy). Loads are converted to fp32 at once; the
online softmax (base-2, scale folded in) and the accumulator are fp32. On a GPU the fp32 tiles
are cast back to the input dtype right before `tl.dot` (`DOT_IN_INPUT_DTYPE`), so bf16/fp16
inputs use tensor cores; under the Triton interpreter everything stays fp32, because the
interpreter computes bf16 arithmetic wrongly and rounds fp32 -> bf16 by truncation (we round
with an explicit round-to-nearest-even bit trick there, `BIT_ROUND`).

Shared jit helpers here are also used by `fused_attention_triton.py`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# Triton picks interpreter vs. compiler when `@triton.jit` runs, i.e. at import of this module.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

# Tiles used under the interpreter (small: it runs every program in Python/numpy).
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32

# GPU: autotuned for L >= AUTOTUNE_MIN_L (the model's long sequences; tuned once per (L, D,
# GQA group, dtype)); shorter sequences use SMALL_L_CONFIG, so tests do not pay for tuning.
# The autotuner drops configs that run out of resources (smaller GPUs' shared memory).
GPU_CONFIGS = [  # H100, L=4608 D=128 bf16: 64/64/w4/s3 was fastest (1.05 ms, ~500 TFLOP/s)
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
]
AUTOTUNE_MIN_L = 1024
SMALL_L_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


# ---------------------------------------------------------------- shared jit helpers
@triton.jit
def _round_bf16_rtne(x):
    """fp32 -> nearest bf16 value (ties to even), returned as fp32. Pure integer ops."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, BIT_ROUND: tl.constexpr):
    """Round fp32 `x` to DTYPE's precision, keeping fp32 storage (a no-op for fp32)."""
    if DTYPE == tl.float32:
        return x
    elif DTYPE == tl.bfloat16 and BIT_ROUND:
        return _round_bf16_rtne(x)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _dot_operand(x, DTYPE: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr):
    if DOT_IN_INPUT_DTYPE:
        return x.to(DTYPE)
    else:
        return x


@triton.jit
def _load_raw(ptrs, ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=ok, other=0)


@triton.jit
def _load_f32(ptrs, ok, EVEN: tl.constexpr):
    """Load (masked unless EVEN, zeros outside) and convert to fp32 at once."""
    return _load_raw(ptrs, ok, EVEN).to(tl.float32)


@triton.jit
def _attn_tile(qa, qb, k_base, s_kl, s_kd, v_base, s_vl, s_vd, mask_ptr, s_ml, start_n, L,
               m_i, l_i, acc, qk_scale,
               DT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
               EVEN: tl.constexpr, PAIRS: tl.constexpr,
               DOT_IN_INPUT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K/V tile of the flash loop: scores, key masking, online-softmax update, P·V.

    PAIRS=False: qa is the (BLOCK_M, D) query tile (qb unused), K rows are plain.
    PAIRS=True: qa/qb are the (BLOCK_M, D/2) even/odd halves and each K row is stored as
    [evens | odds], so q·k = qa·ka + qb·kb. EVEN: the tile lies inside [0, L), no bounds masks.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = offs_n < L
    if PAIRS:
        HALF: tl.constexpr = HEAD_DIM // 2
        kp = k_base + offs_n[None, :] * s_kl + tl.arange(0, HALF)[:, None] * s_kd
        ka = _load_f32(kp, in_range[None, :], EVEN)
        kb = _load_f32(kp + HALF * s_kd, in_range[None, :], EVEN)
        s = tl.dot(qa, _dot_operand(ka, DT, DOT_IN_INPUT_DTYPE), input_precision=DOT_PRECISION)
        s = tl.dot(qb, _dot_operand(kb, DT, DOT_IN_INPUT_DTYPE), s, input_precision=DOT_PRECISION)
    else:  # K tile loaded transposed: (HEAD_DIM, BLOCK_N)
        kt = _load_f32(k_base + offs_n[None, :] * s_kl + offs_d[:, None] * s_kd, in_range[None, :], EVEN)
        s = tl.dot(qa, _dot_operand(kt, DT, DOT_IN_INPUT_DTYPE), input_precision=DOT_PRECISION)
    s = s * qk_scale
    if HAS_MASK:  # out-of-range keys load as 0 = masked
        keep = _load_raw(mask_ptr + offs_n * s_ml, in_range, EVEN) != 0
        s = tl.where(keep[None, :], s, float("-inf"))
    elif not EVEN:
        s = tl.where(in_range[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows that have seen only masked keys keep m = -inf; subtract 0 instead (no inf - inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_f32(v_base + offs_n[:, None] * s_vl + offs_d[None, :] * s_vd, in_range[:, None], EVEN)
    acc = tl.dot(_dot_operand(p, DT, DOT_IN_INPUT_DTYPE), _dot_operand(v, DT, DOT_IN_INPUT_DTYPE),
                 acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _finish(acc, l_i):
    """Normalise; rows with no valid key (l == 0, acc == 0) come out as zeros."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


# ---------------------------------------------------------------- plain attention kernel
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Mask, O,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_mb, s_ml,
    s_ob, s_oh, s_ol, s_od,
    H, L, GROUP, qk_scale,
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
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    q = _dot_operand(q, DT, DOT_IN_INPUT_DTYPE)

    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    mask_ptr = Mask + b * s_mb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _attn_tile(q, q, k_base, s_kl, s_kd, v_base, s_vl, s_vd, mask_ptr, s_ml, start_n, L,
                                   m_i, l_i, acc, qk_scale, DT, HEAD_DIM, BLOCK_N, HAS_MASK, True, False,
                                   DOT_IN_INPUT_DTYPE, DOT_PRECISION)
    if n_full < L:  # ragged last tile
        m_i, l_i, acc = _attn_tile(q, q, k_base, s_kl, s_kd, v_base, s_vl, s_vd, mask_ptr, s_ml, n_full, L,
                                   m_i, l_i, acc, qk_scale, DT, HEAD_DIM, BLOCK_N, HAS_MASK, False, False,
                                   DOT_IN_INPUT_DTYPE, DOT_PRECISION)

    out = _round_to(_finish(acc, l_i), DT, BIT_ROUND)
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


_attn_fwd_tuned = None if INTERPRETED else triton.autotune(configs=GPU_CONFIGS, key=["L", "HEAD_DIM", "GROUP"])(
    _attn_fwd_kernel)


# ---------------------------------------------------------------- host side
def launch(kernel, tuned, on_cuda: bool, L: int, n_heads_total: int, args: tuple, flags: dict) -> None:
    """Grid (query tiles, B*H): autotuned on a GPU for long sequences, fixed tiles otherwise."""
    if tuned is not None and on_cuda and L >= AUTOTUNE_MIN_L:
        tuned[lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), n_heads_total)](*args, **flags)
        return
    cfg = dict(SMALL_L_CONFIG) if on_cuda and not INTERPRETED else dict(
        BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N)  # module globals, read per call
    kernel[(triton.cdiv(L, cfg["BLOCK_M"]), n_heads_total)](*args, **flags, **cfg)


def launch_options(t: torch.Tensor) -> dict:
    """Constexpr flags that depend on where the kernel runs and on the dtype."""
    on_gpu = t.is_cuda and not INTERPRETED
    return dict(
        DOT_IN_INPUT_DTYPE=on_gpu,
        # fp32 inputs: exact fp32 dots (tf32 would lose ~3 digits); bf16/fp16 are unaffected.
        DOT_PRECISION="ieee" if (t.dtype == torch.float32 or not on_gpu) else "tf32",
        BIT_ROUND=not on_gpu,
    )


def device_reason(*tensors: torch.Tensor) -> str | None:
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return "tensors are on different devices"
    if dev.type == "cuda":
        return "TRITON_INTERPRET=1 is set but the tensors are on CUDA" if INTERPRETED else None
    if dev.type == "cpu" and INTERPRETED:
        return None
    return f"tensors are on {dev.type} and the Triton interpreter is not enabled (TRITON_INTERPRET=1)"


def key_mask_reason(key_mask: torch.Tensor | None, B: int, L: int) -> str | None:
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool:
        return f"key_mask dtype {key_mask.dtype} is not torch.bool"
    if tuple(key_mask.shape) != (B, L):
        return f"key_mask shape {tuple(key_mask.shape)} is not (B, L) = {(B, L)}"
    return None


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> str | None:
    """None if `attention_triton` handles these inputs, else a short reason why not."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, H, L, D)"
    B, H, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        return f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}"
    Hkv, Lk = k.shape[1], k.shape[2]
    if Lk != L:
        return f"query length {L} != key length {Lk}"
    if Hkv == 0 or H % Hkv != 0:
        return f"query heads {H} are not a multiple of KV heads {Hkv}"
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head dim {D} not in {SUPPORTED_HEAD_DIMS}"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype} k={k.dtype} v={v.dtype} (need one of fp16/bf16/fp32 for all)"
    return key_mask_reason(key_mask, B, L) or device_reason(q, k, v, *([] if key_mask is None else [key_mask]))


def mask_args(key_mask: torch.Tensor | None, fallback: torch.Tensor):
    """(pointer tensor, stride_b, stride_l) for the kernel; a dummy pointer when there is no mask."""
    if key_mask is None:
        return fallback, 0, 0
    m = key_mask.view(torch.uint8)  # same itemsize: works on any strides
    return m, m.stride(0), m.stride(1)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D), keys masked by key_mask) v with grouped-query heads.

    q (B, H, L, D), k/v (B, Hkv, L, D) — any strides; key_mask (B, L) bool, True = attend.
    Returns a new contiguous (B, H, L, D) tensor in q's dtype. A query row whose keys are all
    masked gets zeros (SDPA would give NaN). Raises ValueError on unsupported inputs
    (see `triton_supports`).
    """
    reason = triton_supports(q, k, v, key_mask)
    if reason is not None:
        raise ValueError(f"attention_triton: {reason}")
    B, H, L, D = q.shape
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    m, s_mb, s_ml = mask_args(key_mask, q)
    args = (q, k, v, m, out, *q.stride(), *k.stride(), *v.stride(), s_mb, s_ml, *out.stride(),
            H, L, H // k.shape[1], LOG2E / math.sqrt(D))
    flags = dict(HEAD_DIM=D, HAS_MASK=key_mask is not None, **launch_options(q))
    launch(_attn_fwd_kernel, _attn_fwd_tuned, q.is_cuda, L, B * H, args, flags)
    return out
