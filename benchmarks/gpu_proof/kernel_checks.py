"""Kernel correctness checks of the GPU proof: every quantized-matmul, W8A8 and attention path
on the device against the plain-torch reference computed on the CPU in float32 (fresh random inputs).

Each `*_checks(ctx)` yields (name, fn); fn() returns (ok, detail) or (ok, detail, skipped). Paths go
through `krea2_lite.kernels` dispatch with KREA2_LITE_KERNELS set as users set it, so a check of
`…/triton` fails if the Triton kernel declines the input instead of silently falling back.

Tolerances (relative L2 error): float32 on the CPU 1e-4 (1e-3 for whole W8A8 layers with a rotation:
a last-bit difference in a rotated sum may move one code by a step); bf16 / fp16 on the GPU 2e-2
(the output is rounded to bf16; measured errors are ~4e-3).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def kernels_backend(name: str):
    """KREA2_LITE_KERNELS=name for the duration (dispatch reads it on every call)."""
    old = os.environ.get("KREA2_LITE_KERNELS")
    os.environ["KREA2_LITE_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KREA2_LITE_KERNELS", None)
        else:
            os.environ["KREA2_LITE_KERNELS"] = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def tolerance(ctx, loose: bool = False) -> float:
    if ctx.dtype == torch.float32:
        return 1e-3 if loose else 1e-4
    return 2e-2


def verdict(err: float, tol: float, extra: str = "") -> tuple[bool, str]:
    return err <= tol, f"rel err {err:.2e} (tol {tol:.0e}){'; ' + extra if extra else ''}"


def shapes(ctx) -> dict:
    """Small shapes that still exercise ragged tiles: (M tokens, K in, N out)."""
    if ctx.tiny:
        return dict(M=20, K=128, N=48, L=40, H=4, Hkv=2, D=64)
    return dict(M=300, K=1024, N=768, L=333, H=8, Hkv=2, D=128)


def _weights(ctx, dtype: str, N: int, K: int, rotate: int = 0, seed: int = 0):
    from krea2_lite.quantize.qlinear import quantize_weight_tensors

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    group = 128 if dtype == "int4" else None
    qdata, scale, shift = quantize_weight_tensors(w, dtype, group, ctx.dtype, rotate)
    bias = (torch.randn(N, generator=g) * 0.1).to(ctx.dtype)
    return qdata, scale, shift, group, bias


def _x(ctx, M: int, K: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    x[:, 5] *= 30  # an outlier channel, as real activations have
    return x.to(ctx.dtype)


def qmatmul_checks(ctx):
    from krea2_lite import kernels
    from krea2_lite.kernels.qmatmul_torch import qmatmul_torch
    from krea2_lite.kernels.qmatmul_triton import qmatmul_supports

    s = shapes(ctx)
    for dtype in ("int8", "fp8", "int4"):
        for backend in ("triton", "auto"):
            def check(dtype=dtype, backend=backend):
                qdata, scale, shift, group, bias = _weights(ctx, dtype, s["N"], s["K"])
                x = _x(ctx, s["M"], s["K"])
                ref = qmatmul_torch(x.float(), qdata, scale.float(), None if shift is None else shift.float(), dtype,
                                    group, s["N"], s["K"], bias.float())
                dev = [t.to(ctx.device) if t is not None else None for t in (x, qdata, scale, shift, bias)]
                args = (dev[1], dev[2], dev[3], dtype, group, s["N"], s["K"], dev[4])
                if backend == "triton":
                    reason = qmatmul_supports(dev[0], *args)
                    if reason is not None:
                        return False, f"the Triton kernel declined the input: {reason}"
                with kernels_backend(backend):
                    out = kernels.qmatmul(dev[0], *args)
                return verdict(rel_err(out, ref), tolerance(ctx), f"M={s['M']} K={s['K']} N={s['N']} {ctx.dtype}")
            yield f"qmatmul/{dtype}/{backend}", check


def _gguf_blocks(qtype: str, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """Valid GGUF blocks (random bits, small fp16 d / dmin where the type keeps them)."""
    from krea2_lite.files.gguf_container import BLOCK_TYPES

    block, size = BLOCK_TYPES[qtype]
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (N, K // block, size), dtype=torch.uint8, generator=g)
    d = (torch.rand(N, K // block, 1, generator=g) * 0.01 + 0.002).half().view(torch.uint8)
    for offset in {"Q8_0": (0,), "Q4_K": (0, 2)}[qtype]:
        data[..., offset:offset + 2] = d.reshape(N, K // block, 2)
    return data.reshape(N, -1)


def gguf_checks(ctx):
    """GGUF Q8_0 / Q4_K dequant-matmul (issue 25) on the device vs the CPU torch reference."""
    from krea2_lite import kernels
    from krea2_lite.kernels.gguf_dequant_torch import gguf_linear_torch
    from krea2_lite.kernels.gguf_triton import gguf_matmul_supports

    s = shapes(ctx)
    K, N = max(256, s["K"] // 256 * 256), s["N"]
    for qtype in ("Q8_0", "Q4_K"):
        for backend in ("triton", "auto"):
            def check(qtype=qtype, backend=backend):
                qdata, x = _gguf_blocks(qtype, N, K), _x(ctx, s["M"], K)
                bias = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(ctx.dtype)
                ref = gguf_linear_torch(x.float(), qdata, qtype, N, K, bias.float())
                dev = [t.to(ctx.device) for t in (x, qdata, bias)]
                if backend == "triton":
                    reason = gguf_matmul_supports(dev[0], dev[1], qtype, N, K, dev[2])
                    if reason is not None:
                        return False, f"the Triton kernel declined the input: {reason}"
                with kernels_backend(backend):
                    out = kernels.gguf_linear(dev[0], dev[1], qtype, N, K, dev[2])
                return verdict(rel_err(out, ref), tolerance(ctx), f"M={s['M']} K={K} N={N} {ctx.dtype}")
            yield f"gguf_linear/{qtype}/{backend}", check


def _w8a8_case(ctx, act: str, rotate: int, seed: int = 0):
    s = shapes(ctx)
    qdata, scale, _, _, bias = _weights(ctx, act, s["N"], s["K"], rotate, seed)
    return s, _x(ctx, s["M"], s["K"], seed + 1), qdata, scale, bias


def _quantizer_check(ctx, act: str, rotate: int):
    from krea2_lite.kernels.act_quant_torch import act_quant_torch
    from krea2_lite.kernels.act_quant_triton import act_quant_supports, act_quant_triton

    _, x, _, _, _ = _w8a8_case(ctx, act, rotate)
    x = x.to(ctx.device)
    reason = act_quant_supports(x, act, rotate)
    if reason is not None:
        return False, f"the Triton quantizer declined the input: {reason}"
    q1, s1 = act_quant_triton(x, act, rotate)
    q0, s0 = act_quant_torch(x, act, rotate)
    scale_err = rel_err(s1, s0)
    differ = (q1.float() != q0.float()).float().mean().item()
    # Without rotation: identical codes. With it: summation order may flip a code by one step.
    allowed = 0.005 if rotate else 0.0
    ok = scale_err <= 1e-6 and differ <= allowed
    return ok, f"scale rel err {scale_err:.1e}; {differ:.3%} of codes differ (allowed {allowed:.1%})"


def _int_mm_check(ctx, rotate: int):
    from krea2_lite.kernels.act_quant_torch import act_quant_torch
    from krea2_lite.kernels.w8a8_torch import int8_mm_exact

    _, x, qdata, _, _ = _w8a8_case(ctx, "int8", rotate)
    xq, _ = act_quant_torch(x.float(), "int8", rotate)
    ref = (xq.double() @ qdata.double().t()).to(torch.int32)
    out = int8_mm_exact(xq.to(ctx.device), qdata.to(ctx.device))
    path = "torch._int_mm" if ctx.device.type == "cuda" else "float64 (CPU path of int8_mm_exact)"
    equal = torch.equal(out.cpu(), ref)
    return equal, f"exact int32 accumulation via {path}: {'equal' if equal else 'DIFFERS'}"


def _gemm_check(ctx, act: str, rotate: int, which: str):
    from krea2_lite.kernels.act_quant_torch import act_quant_torch
    from krea2_lite.kernels.w8a8_torch import scaled_mm_fp8, scaled_mm_reason, w8a8_matmul_torch
    from krea2_lite.kernels.w8a8_triton import w8a8_matmul_triton, w8a8_supports

    _, x, qdata, scale, bias = _w8a8_case(ctx, act, rotate)
    xq, sx = act_quant_torch(x.float(), act, rotate)
    ref = w8a8_matmul_torch(xq, sx, qdata, scale, bias, torch.float32)
    d = [t.to(ctx.device) for t in (xq, sx, qdata, scale, bias)]
    if which == "scaled_mm":
        reason = scaled_mm_reason(d[0], d[2])
        if reason is not None:
            return False, f"not applicable here: {reason}", True
        out = scaled_mm_fp8(*d, ctx.dtype)
    else:
        reason = w8a8_supports(*d, ctx.dtype)
        if reason is not None:
            return False, f"the Triton GEMM declined the input: {reason}"
        out = w8a8_matmul_triton(*d, ctx.dtype)
    exact = torch.equal(out.cpu(), ref.to(ctx.dtype))
    # _scaled_mm rounds its output to bf16 (row-wise scaling needs it), also when the layer runs in fp32.
    tol = 1e-2 if which == "scaled_mm" else tolerance(ctx)
    return verdict(rel_err(out, ref), tol, "bit-identical to the reference" if exact else "")


def _layer_check(ctx, act: str, rotate: int, backend: str, swiglu: bool = False):
    from krea2_lite import kernels
    from krea2_lite.kernels.w8a8_torch import dequant_matmul, w8a8_linear_torch

    s, x, qdata, scale, bias = _w8a8_case(ctx, act, rotate)
    up = _x(ctx, s["M"], s["K"], seed=7) if swiglu else None
    inp = F.silu(x.float()) * up.float() if swiglu else x.float()
    ref = w8a8_linear_torch(inp, qdata, scale.float(), bias.float(), act, rotate)
    d = [t.to(ctx.device) for t in (x, qdata, scale, bias)]
    if backend == "dequant":
        out = dequant_matmul(d[0], d[1], d[2], d[3], act, rotate, None)
    else:
        with kernels_backend(backend):
            out = kernels.w8a8_linear(d[0], d[1], d[2], d[3], act, rotate, up=None if up is None else up.to(ctx.device))
    return verdict(rel_err(out, ref), tolerance(ctx, loose=bool(rotate) or swiglu), f"{ctx.dtype} in/out")


def w8a8_checks(ctx):
    for act in ("int8", "fp8"):
        for rotate in (0, 128):
            base = f"w8a8/{act}" + ("/rot" if rotate else "")
            yield f"{base}/quantizer", lambda a=act, r=rotate: _quantizer_check(ctx, a, r)
            if act == "int8":
                yield f"{base}/int_mm", lambda r=rotate: _int_mm_check(ctx, r)
                yield f"{base}/gemm-triton", lambda r=rotate: _gemm_check(ctx, "int8", r, "triton")
            else:
                yield f"{base}/scaled_mm", lambda r=rotate: _gemm_check(ctx, "fp8", r, "scaled_mm")
            for backend in ("auto", "triton"):
                yield f"{base}/{backend}", lambda a=act, r=rotate, b=backend: _layer_check(ctx, a, r, b)
        yield f"w8a8/{act}/dequant", lambda a=act: _layer_check(ctx, a, 0, "dequant")
        yield f"w8a8/{act}/swiglu/triton", lambda a=act: _layer_check(ctx, a, 0, "triton", swiglu=True)


def _attention_inputs(ctx, seed: int = 3):
    s = shapes(ctx)
    g = torch.Generator().manual_seed(seed)
    B, L, H, Hkv, D = 2, s["L"], s["H"], s["Hkv"], s["D"]
    q, k, v = (torch.randn(B, L, h, D, generator=g) for h in (H, Hkv, Hkv))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, L - L // 4:] = False  # padded text keys in the second sample
    return q, k, v, mask


def _attention_check(ctx, backend: str):
    from krea2_lite import kernels
    from krea2_lite.kernels.attention_torch import attention_torch
    from krea2_lite.kernels.attention_triton import triton_supports

    q, k, v, mask = (t.transpose(1, 2) if t.dim() == 4 else t for t in _attention_inputs(ctx))
    ref = attention_torch(q, k, v, mask)
    d = [t.to(ctx.device, ctx.dtype) if t.is_floating_point() else t.to(ctx.device) for t in (q, k, v, mask)]
    if backend == "triton":
        reason = triton_supports(*d)
        if reason is not None:
            return False, f"the Triton kernel declined the input: {reason}"
    with kernels_backend(backend):
        out = kernels.attention(*d)
    return verdict(rel_err(out, ref), tolerance(ctx), f"B=2 L={q.shape[2]} H={q.shape[1]} Hkv={k.shape[1]} key mask")


def _fused_check(ctx, backend: str):
    from krea2_lite import kernels
    from krea2_lite.kernels.fused_attention_torch import fused_attention_torch
    from krea2_lite.kernels.fused_attention_triton import fused_supports

    q, k, v, mask = _attention_inputs(ctx)
    B, L, H, D = q.shape
    g = torch.Generator().manual_seed(4)
    q_scale, k_scale = 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)
    ang = torch.rand(1, L, D // 2, generator=g) * 100
    cos, sin = ang.cos(), ang.sin()
    gate = torch.randn(B, L, H * D, generator=g)
    ref = fused_attention_torch(q, k, v, q_scale, k_scale, cos, sin, gate, mask)
    cast = lambda t: t.to(ctx.device, ctx.dtype)  # noqa: E731
    args = (cast(q), cast(k), cast(v), q_scale.to(ctx.device), k_scale.to(ctx.device), cos.to(ctx.device),
            sin.to(ctx.device), cast(gate), mask.to(ctx.device))
    if backend == "triton":
        reason = fused_supports(*args, 1e-5)
        if reason is not None:
            return False, f"the Triton kernel declined the input: {reason}"
    with kernels_backend(backend):
        out = kernels.fused_attention(*args)
    return verdict(rel_err(out, ref), tolerance(ctx), "q/k RMSNorm + RoPE + GQA + gate, key mask")


def attention_checks(ctx):
    yield "attention/triton", lambda: _attention_check(ctx, "triton")
    yield "attention/auto", lambda: _attention_check(ctx, "auto")
    yield "attention/fused", lambda: _fused_check(ctx, "triton")
    yield "attention/fused/auto", lambda: _fused_check(ctx, "auto")
