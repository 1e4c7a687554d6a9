"""Kernel benchmarks on a CUDA GPU: Triton attention / fused Krea 2 attention / quantized matmuls vs torch.

    python -m benchmarks.bench_kernels                      # Krea 2 shape: B=1, L=4608, H=48, Hkv=12, D=128, bf16
    python -m benchmarks.bench_kernels --json out.json --repeats 50
    python -m benchmarks.bench_kernels --only matmul,act-quant --tokens 4608 1024 256

Matmul groups (one per layer shape N×K: 6144×6144 attention, 1536×6144 k/v, 16384×6144 MLP
gate/up, 6144×16384 MLP down; M = --tokens): the baseline is cuBLAS bf16 `F.linear`; rows are the
weight-only Triton dequant-matmul (int8, fp8, int4 g128), dequantize + cuBLAS (what `auto` runs for
weight-only), W8A8 int8 GEMMs on pre-quantized activations (Triton, `torch._int_mm` + epilogue),
W8A8 fp8 `torch._scaled_mm` (sm_89+), whole W8A8 layers (activation quantizer + GEMM: the Triton
pair, the `auto` pair, with the rotation) and the dequantize-into-scratch + cuBLAS W8A8 path. The
`speedup` column is the ratio to cuBLAS bf16 at the same shape, in the same run: the issue's goal
is a W8A8 step ≤ 0.55× and W4A16 ≤ 1.15× of bf16 time (speedup ≥ 1.82× and ≥ 0.87×). Act-quant
groups time the per-token quantizers alone (GB/s of x read + q written instead of TFLOP/s).

Every case is a `Case` in a list built by a `*_cases()` function; to add e.g. matmul kernels,
write a `matmul_cases(args)` returning more `Case`s and add it to `CASE_BUILDERS`. Within a
`group`, the case with `baseline=True` is the reference: `speedup` = baseline ms / case ms,
and its output is what the other cases' outputs are checked against (max abs diff, once,
before timing). TFLOP/s uses the case's `flops` (4·B·H·L²·D for attention).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import time_ms


@dataclass
class Case:
    name: str
    group: str
    fn: Callable[[], torch.Tensor]
    flops: float
    shape: str
    dtype: torch.dtype
    baseline: bool = False
    result: dict = field(default_factory=dict)


def _sdpa_with(backend, *args, **kwargs):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*args, **kwargs)


def attention_cases(args) -> list[Case]:
    from torch.nn.attention import SDPBackend

    from krea2_lite.kernels.attention_triton import attention_triton
    from krea2_lite.kernels.attention_torch import attention_torch

    B, L, H, Hkv, D, dt, dev = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.dtype, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    # Projections are (B, L, heads, D) in the model; hand the kernels (B, heads, L, D) views.
    q = torch.randn(B, L, H, D, device=dev, dtype=dt, generator=g).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D, device=dev, dtype=dt, generator=g).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, device=dev, dtype=dt, generator=g).transpose(1, 2)
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask[:, L - L // 8:] = False  # padded tail, like a short text prompt
    rep = H // Hkv
    k_rep, v_rep = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # outside the timing
    flops = 4.0 * B * H * L * L * D
    shape = f"B={B} L={L} H={H} Hkv={Hkv} D={D}"

    def case(name, group, fn, baseline=False):
        return Case(name, group, fn, flops, shape, dt, baseline)

    return [
        case("sdpa flash (K/V repeated)", "attention, no mask",
             lambda: _sdpa_with(SDPBackend.FLASH_ATTENTION, q, k_rep, v_rep), baseline=True),
        case("sdpa cudnn (enable_gqa)", "attention, no mask",
             lambda: _sdpa_with(SDPBackend.CUDNN_ATTENTION, q, k, v, enable_gqa=True)),
        case("attention_triton", "attention, no mask", lambda: attention_triton(q, k, v)),
        case("sdpa (key mask, torch's pick)", "attention, key mask",
             lambda: attention_torch(q, k, v, mask), baseline=True),
        case("attention_triton (key mask)", "attention, key mask", lambda: attention_triton(q, k, v, mask)),
    ]


def fused_cases(args) -> list[Case]:
    from krea2_lite.kernels.fused_attention_triton import fused_attention
    from krea2_lite.kernels.fused_attention_torch import fused_attention_torch

    B, L, H, Hkv, D, dt, dev = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.dtype, "cuda"
    g = torch.Generator(device=dev).manual_seed(1)
    qkv = torch.randn(B, L, (H + 2 * Hkv) * D, device=dev, dtype=dt, generator=g)  # fused projection output
    q = qkv[..., : H * D].unflatten(-1, (H, D))
    k = qkv[..., H * D: (H + Hkv) * D].unflatten(-1, (Hkv, D))
    v = qkv[..., (H + Hkv) * D:].unflatten(-1, (Hkv, D))
    q_scale = 0.1 * torch.randn(D, device=dev, generator=g)
    k_scale = 0.1 * torch.randn(D, device=dev, generator=g)
    ang = torch.rand(1, L, D // 2, device=dev, generator=g) * 100
    cos, sin = ang.cos(), ang.sin()
    gate = torch.randn(B, L, H * D, device=dev, dtype=dt, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask[:, L - L // 8:] = False
    a = (q, k, v, q_scale, k_scale, cos, sin, gate, mask)

    flops = 4.0 * B * H * L * L * D
    shape = f"B={B} L={L} H={H} Hkv={Hkv} D={D} +norm/rope/gate, key mask"
    group = "fused Krea 2 attention"
    return [
        Case("fused_attention_torch (unfused)", group, lambda: fused_attention_torch(*a), flops, shape, dt, True),
        Case("fused_attention (triton)", group, lambda: fused_attention(*a), flops, shape, dt),
    ]


MATMUL_SHAPES = [(6144, 6144), (1536, 6144), (16384, 6144), (6144, 16384)]  # (N, K)


def matmul_cases(args) -> list[Case]:
    from krea2_lite.kernels.act_quant_torch import act_quant_torch
    from krea2_lite.kernels.act_quant_triton import act_quant_triton
    from krea2_lite.kernels.qmatmul_torch import qmatmul_torch
    from krea2_lite.kernels.qmatmul_triton import qmatmul_triton
    from krea2_lite.kernels.w8a8_torch import (dequant_matmul, scaled_mm_fp8, w8a8_epilogue, w8a8_linear_torch)
    from krea2_lite.kernels.w8a8_triton import w8a8_matmul_triton
    from krea2_lite.kernels.workspace import KernelWorkspace
    from krea2_lite.quantize.qlinear import quantize_weight_tensors

    dt, dev = args.dtype, args.device
    workspace = KernelWorkspace()  # one reused dequantization buffer, as a loaded model has
    cases = []
    for M in args.tokens:
        for N, K in MATMUL_SHAPES:
            g = torch.Generator(device=dev).manual_seed(N + K)
            x = torch.randn(M, K, device=dev, dtype=dt, generator=g)
            w = torch.randn(N, K, device=dev, generator=g) * 0.02
            w_bf = w.to(dt)
            q = {d: quantize_weight_tensors(w, d, 128 if d == "int4" else None, dt) for d in ("int8", "fp8", "int4")}
            wq8, sw8 = q["int8"][0], q["int8"][1]
            wr8, swr8, _ = quantize_weight_tensors(w, "int8", None, dt, rotate=128)
            wf8, swf8 = q["fp8"][0], q["fp8"][1]
            xq8, sx8 = act_quant_torch(x, "int8")
            xf8, sxf8 = act_quant_torch(x, "fp8")
            flops = 2.0 * M * N * K
            group, shape = f"matmul M={M} N×K={N}×{K}", f"M={M} N={N} K={K}"

            def case(name, fn, baseline=False):
                cases.append(Case(name, group, fn, flops, shape, dt, baseline))

            case("cuBLAS bf16 F.linear", lambda x=x, w=w_bf: F.linear(x, w), baseline=True)
            for d in ("int8", "fp8", "int4"):
                qd, sd, shd = q[d]
                gs = 128 if d == "int4" else None
                case(f"W{'4' if d == 'int4' else '8'}A16 {d} Triton dequant-matmul",
                     lambda x=x, a=(qd, sd, shd, d, gs, N, K): qmatmul_triton(x, *a))
            case("W8A16 int8 dequantize + cuBLAS (auto)",
                 lambda x=x, a=(wq8, sw8, None, "int8", None, N, K): qmatmul_torch(x, *a))
            case("W4A16 int4 dequantize + cuBLAS (auto)",
                 lambda x=x, a=(*q["int4"], "int4", 128, N, K): qmatmul_torch(x, *a))
            case("W8A8 int8 GEMM only, Triton", lambda a=(xq8, sx8, wq8, sw8, None, dt): w8a8_matmul_triton(*a))
            case("W8A8 int8 GEMM only, torch._int_mm + epilogue",
                 lambda: w8a8_epilogue(torch._int_mm(xq8, wq8.t()), sx8, sw8, None, dt))
            case("W8A8 fp8 GEMM only, torch._scaled_mm", lambda a=(xf8, sxf8, wf8, swf8, None, dt): scaled_mm_fp8(*a))
            case("W8A8 int8 layer: Triton quantizer + Triton GEMM",
                 lambda x=x: w8a8_matmul_triton(*act_quant_triton(x, "int8"), wq8, sw8, None, dt))
            case("W8A8 int8 layer, rotated: Triton quantizer (fused H128) + Triton GEMM",
                 lambda x=x: w8a8_matmul_triton(*act_quant_triton(x, "int8", 128), wr8, swr8, None, dt))
            case("W8A8 int8 layer: torch quantizer + torch._int_mm (auto)",
                 lambda x=x: w8a8_linear_torch(x, wq8, sw8, None, "int8"))
            case("W8A8 fp8 layer: Triton quantizer + torch._scaled_mm",
                 lambda x=x: scaled_mm_fp8(*act_quant_triton(x, "fp8"), wf8, swf8, None, dt))
            case("W8A8 int8 layer: fake-quant x + dequantize W into scratch + cuBLAS",
                 lambda x=x: dequant_matmul(x, wq8, sw8, None, "int8", 0, workspace.scratch(x.device, dt, N * K)))
    return cases


def act_quant_cases(args) -> list[Case]:
    from krea2_lite.kernels.act_quant_torch import act_quant_torch
    from krea2_lite.kernels.act_quant_triton import act_quant_triton

    dt, dev = args.dtype, args.device
    cases = []
    for M in args.tokens:
        for K in (6144, 16384):
            x = torch.randn(M, K, device=dev, dtype=dt)
            moved = M * K * (x.element_size() + 1)  # bytes read + written; ×1e3 makes the TFLOP/s column GB/s
            group, shape = f"act-quant M={M} K={K}", f"M={M} K={K}"
            for rot in (0, 128):
                tag = f", rotation {rot}" if rot else ""
                for d in ("int8", "fp8"):
                    cases.append(Case(f"torch quantizer {d}{tag}", group, lambda x=x, d=d, r=rot: act_quant_torch(
                        x, d, r)[0].view(torch.uint8), moved * 1e3, shape, dt, baseline=(d == "int8" and not rot)))
                    cases.append(Case(f"Triton quantizer {d}{tag}", group, lambda x=x, d=d, r=rot: act_quant_triton(
                        x, d, r)[0].view(torch.uint8), moved * 1e3, shape, dt))
    return cases


CASE_BUILDERS = [attention_cases, fused_cases, matmul_cases, act_quant_cases]


def run_cases(cases: list[Case], warmup: int, repeats: int) -> None:
    refs: dict[str, torch.Tensor] = {}
    for c in cases:  # correctness once, before any timing
        try:
            out = c.fn()
            torch.cuda.synchronize()
        except Exception as exc:  # e.g. a backend this torch/GPU lacks
            c.result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            continue
        if c.baseline:
            refs[c.group] = out
        ref = refs.get(c.group)
        if ref is not None and not c.baseline:
            diff = (out.float() - ref.float()).abs()
            c.result["max_abs_diff"] = float(diff.nan_to_num(nan=float("inf")).max())
    for c in cases:
        if "error" in c.result:
            continue
        ms = statistics.median(time_ms(c.fn, "cuda", repeats, warmup))  # median of event-timed calls
        c.result.update(ms=ms, tflops=c.flops / ms / 1e9)
    base = {c.group: c.result.get("ms") for c in cases if c.baseline}
    for c in cases:
        if "ms" in c.result and base.get(c.group):
            c.result["speedup"] = base[c.group] / c.result["ms"]


def print_table(cases: list[Case], device: str) -> None:
    print(f"\ndevice: {device}\n")
    print("| group | case | dtype | shape | ms | TFLOP/s (act-quant: GB/s) | speedup vs baseline | max abs diff |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for c in cases:
        r = c.result
        dt = str(c.dtype).replace("torch.", "")
        if "error" in r:
            print(f"| {c.group} | {c.name} | {dt} | {c.shape} | n/a | n/a | n/a | {r['error']} |")
            continue
        diff = "baseline" if c.baseline else (f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-")
        print(f"| {c.group} | {c.name} | {dt} | {c.shape} | {r['ms']:.3f} | {r['tflops']:.1f} | "
              f"{r.get('speedup', float('nan')):.2f}x | {diff} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="only cuda is benchmarked (default: cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4608)
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, nargs="+", default=[4608], help="M of the matmul / act-quant groups")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30, help="timed calls per case (median reported; >= 20)")
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching groups")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON to OUT")
    args = p.parse_args(argv)
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        print("skipped: needs CUDA")
        return 0
    args.repeats = max(args.repeats, 20)
    args.dtype = getattr(torch, args.dtype)
    cases = [c for build in CASE_BUILDERS for c in build(args)]
    if args.only:
        keys = [s.strip() for s in args.only.split(",") if s.strip()]
        cases = [c for c in cases if any(key in c.group for key in keys)]
    run_cases(cases, args.warmup, args.repeats)
    device = torch.cuda.get_device_name()
    print_table(cases, device)
    for mod, name in (("krea2_lite.kernels.attention_triton", "_attn_fwd_tuned"),
                      ("krea2_lite.kernels.fused_attention_triton", "_fused_attn_tuned")):
        tuned = getattr(sys.modules.get(mod), name, None)
        if getattr(tuned, "best_config", None) is not None:
            print(f"{name}: tuned config {tuned.best_config}")
    configs = sys.modules.get("krea2_lite.kernels.configs")
    for (kernel, cap), tuned in (configs.TUNED.items() if configs else []):
        for key, best in getattr(tuned, "cache", {}).items():
            print(f"{kernel} sm_{cap[0]}{cap[1]} {key}: {best}")
    if args.json:
        rows = [dict(device=device, group=c.group, case=c.name, dtype=str(c.dtype), shape=c.shape,
                     flops=c.flops, baseline=c.baseline, **c.result) for c in cases]
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"\nwrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
