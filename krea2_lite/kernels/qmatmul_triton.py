"""Triton dequant-matmul: y (M, N) = x (M, K) · Wᵀ + bias with W stored quantized.

Weights are dequantized tile by tile in registers (the float weight is never materialised),
exactly as `qmatmul_torch` does it: w = q·scale (int8, fp8) or q·scale − shift (int4) in fp32,
rounded to the activation dtype. Accumulation is fp32; bias is fused. Layouts (see
`qmatmul_torch`):

* int8: qdata int8 (N, K), scale (N, 1) per output row.
* fp8 e4m3fn: qdata (N, K) read as raw uint8 bits and decoded with integer ops, so the kernel
  needs no fp8 hardware type (works below sm_89 and under the interpreter).
* int4: qdata uint8 (R, g), R = ceil(G/2), G = N·K/g groups in row-major order; element (n, k)
  is in group i = (n·K + k) // g, stored in packed row i mod R (low nibble if i < R, else
  high), column (n·K + k) mod g; scale/shift (G, 1). Computed per element, so any group size
  dividing N·K works (groups may straddle rows).

Interpreter vs GPU as in `attention_triton`: loads are converted to fp32 at once; on a GPU the
tiles are cast to the activation dtype just before `tl.dot` (bf16/fp16 tensor cores), under the
interpreter everything stays fp32 and bf16 rounding uses the round-to-nearest-even bit trick.
Any M (ragged last tile), any K (masked tail), any N (ragged).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_triton import INTERPRETED, _dot_operand, _round_to, device_reason
from .configs import autotuned, capability, qmatmul_configs

QUANT_DTYPES = ("int8", "fp8", "int4")
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}
_KIND = {"int8": 0, "fp8": 1, "int4": 2}

# Under the interpreter: fixed tiles (every dot dim >= 16), no autotuning.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64)

# GPU: autotuned per capability (`configs.qmatmul_configs`), once per (M bucket, N, K, quant kind).


@triton.jit
def _decode_e4m3(b):
    """uint8 bits of float8 e4m3fn -> fp32 (finite values; no NaN handling: quanto never stores it)."""
    bits = b.to(tl.int32)
    mag = bits & 0x7F
    e = mag >> 3
    # Normal: exponent field e (bias 7) -> fp32 field e + 120 (bias 127); mantissa 3 -> 23 bits.
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    sub = (mag & 7).to(tl.float32) * 0.001953125  # subnormal: m/8 · 2^-6 (also +0)
    v = tl.where(e == 0, sub, normal)
    return tl.where((bits & 0x80) != 0, -v, v)


@triton.jit
def _weight_tile(Q, S, SH, offs_n, offs_k, N, K, s_s, R,
                 KIND: tl.constexpr, GROUP: tl.constexpr):
    """Dequantized fp32 Wᵀ tile (BLOCK_K, BLOCK_N); zeros outside [0, K) x [0, N)."""
    ok = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    n64 = offs_n.to(tl.int64)
    if KIND == 2:  # int4, per element: group, packed row, nibble
        flat = n64[None, :] * K + offs_k[:, None]
        grp = flat // GROUP
        high = grp >= R
        row = tl.where(high, grp - R, grp)
        byte = tl.load(Q + row * GROUP + flat % GROUP, mask=ok, other=0).to(tl.int32)
        q = tl.where(high, byte >> 4, byte & 0xF).to(tl.float32)
        sc = tl.load(S + grp * s_s, mask=ok, other=0.0).to(tl.float32)
        sh = tl.load(SH + grp * s_s, mask=ok, other=0.0).to(tl.float32)
        w = q * sc - sh
    else:
        raw = tl.load(Q + n64[None, :] * K + offs_k[:, None], mask=ok, other=0)
        if KIND == 1:
            q = _decode_e4m3(raw)
        else:
            q = raw.to(tl.float32)
        sc = tl.load(S + n64 * s_s, mask=offs_n < N, other=0.0).to(tl.float32)
        w = q * sc[None, :]
    return w


@triton.jit
def _qmatmul_kernel(
    X, Q, S, SH, B, Y,
    M, N, K, R, M_BUCKET,
    s_xm, s_xk, s_s, s_ym, s_yn,
    KIND: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BIT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    DT: tl.constexpr = X.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    x_rows = X + offs_m.to(tl.int64)[:, None] * s_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * s_xk, mask=m_ok[:, None] & (offs_k[None, :] < K),
                    other=0.0).to(tl.float32)
        # The reference casts the fp32-dequantized weight to the activation dtype.
        w = _round_to(_weight_tile(Q, S, SH, offs_n, offs_k, N, K, s_s, R, KIND, GROUP), DT, BIT_ROUND)
        acc = tl.dot(_dot_operand(x, DT, DOT_IN_INPUT_DTYPE), _dot_operand(w, DT, DOT_IN_INPUT_DTYPE), acc,
                     input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += _round_to(tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32), DT, BIT_ROUND)[None, :]
    out = _round_to(acc, DT, BIT_ROUND)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :] * s_yn
    tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=m_ok[:, None] & (offs_n[None, :] < N))


def qmatmul_supports(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                     dtype: str, group: int | None, out_features: int, in_features: int,
                     bias: torch.Tensor | None = None) -> str | None:
    """None if `qmatmul_triton` handles these inputs, else a short reason why not."""
    if dtype not in QUANT_DTYPES:
        return f"quantized dtype {dtype!r} not in {QUANT_DTYPES}"
    if x.dtype not in ACT_DTYPES:
        return f"activation dtype {x.dtype} (need fp16/bf16/fp32)"
    if x.dim() < 1 or x.shape[-1] != in_features:
        return f"x shape {tuple(x.shape)} does not end in in_features={in_features}"
    if qdata.dtype != _STORAGE[dtype]:
        return f"qdata dtype {qdata.dtype} is not {_STORAGE[dtype]} for {dtype}"
    if not qdata.is_contiguous():
        return "qdata is not contiguous"
    N, K = out_features, in_features
    if dtype == "int4":
        if not group or (N * K) % group:
            return f"int4 group {group} does not divide out·in = {N * K}"
        G = N * K // group
        if tuple(qdata.shape) != ((G + 1) // 2, group):
            return f"int4 qdata shape {tuple(qdata.shape)} != {((G + 1) // 2, group)}"
        if shift is None or tuple(shift.shape) != (G, 1) or tuple(scale.shape) != (G, 1):
            return f"int4 scale/shift must be ({G}, 1)"
        if shift.stride(0) != scale.stride(0):
            return "int4 scale and shift strides differ"
    else:
        if tuple(qdata.shape) != (N, K):
            return f"qdata shape {tuple(qdata.shape)} != {(N, K)}"
        if scale.numel() != N or scale.dim() != 2:
            return f"scale shape {tuple(scale.shape)} != ({N}, 1)"
    if not scale.is_floating_point():
        return f"scale dtype {scale.dtype} is not floating point"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N or not bias.is_contiguous()):
        return f"bias shape {tuple(bias.shape)} is not contiguous ({N},)"
    tensors = [x, qdata, scale] + ([] if shift is None else [shift]) + ([] if bias is None else [bias])
    return device_reason(*tensors)


def qmatmul_triton(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                   dtype: str, group: int | None, out_features: int, in_features: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Wᵀ + bias, W dequantized on the fly; x (..., in) → (..., out) in x.dtype.

    Same semantics as `qmatmul_torch`. Raises ValueError on unsupported inputs
    (see `qmatmul_supports`).
    """
    reason = qmatmul_supports(x, qdata, scale, shift, dtype, group, out_features, in_features, bias)
    if reason is not None:
        raise ValueError(f"qmatmul_triton: {reason}")
    N, K = out_features, in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(x.dtype)
        return y.reshape(*lead, N)
    q = qdata.view(torch.uint8) if dtype == "fp8" else qdata
    sh = shift if shift is not None else scale
    b = bias if bias is not None else scale
    R = q.shape[0] if dtype == "int4" else 0
    on_gpu = x.is_cuda and not INTERPRETED
    m_bucket = min(triton.next_power_of_2(M), 4096)
    args = (x2, q, scale, sh, b, y, M, N, K, R, m_bucket,
            x2.stride(0), x2.stride(1), scale.stride(0), y.stride(0), y.stride(1))
    flags = dict(KIND=_KIND[dtype], GROUP=group if dtype == "int4" else 1, HAS_BIAS=bias is not None,
                 DOT_IN_INPUT_DTYPE=on_gpu,
                 DOT_PRECISION="ieee" if (x.dtype == torch.float32 or not on_gpu) else "tf32",
                 BIT_ROUND=not on_gpu)
    if on_gpu:
        tuned = autotuned(_qmatmul_kernel, qmatmul_configs, capability(x.device),
                          ("M_BUCKET", "N", "K", "KIND", "GROUP"))
        tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
            *args, **flags)
    else:
        cfg = dict(INTERPRET_CONFIG)
        _qmatmul_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))](*args, **flags, **cfg)
    return y.reshape(*lead, N)
