"""One quantized layer per token count, through the dispatch with each choice `auto` can make — the data
from which the GPU proof (benchmarks/gpu_proof/) fills krea2_lite/kernels/tuning.json for the GPU it ran on.

Layer: the MLP up projection (16384×6144 at the full shape). Choices timed, per token count M:
  qmatmul int8 / fp8 / int4: "torch" (dequantize + cuBLAS, today's default), "triton" (dequant-matmul);
  w8a8 int8 / fp8: "torch" (torch quantizer + `_int_mm` / `_scaled_mm`), "triton" (Triton quantizer +
  GEMM), "dequant" (fake-quantized activation × dequantized weight, one cuBLAS GEMM);
and cuBLAS bf16 `F.linear` as the baseline; also the int4 layer with a rank-32 low-rank correction
(`int4-lr32`: the same int4 matmul plus the branch through the LoRA hook, under `auto`), against
the "qmatmul int4" rows for the branch's overhead (issue 19). Each choice is forced through `krea2_lite.kernels` the way a
user's model runs it: KREA2_LITE_KERNELS=triton, or `auto` under a temporary one-GPU tuning table
(KREA2_LITE_TUNING) that names the choice.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics

import torch
import torch.nn.functional as F

from benchmarks.common import time_ms
from benchmarks.gpu_proof.kernel_checks import kernels_backend

CHOICES = {"qmatmul": ("torch", "triton"), "w8a8": ("torch", "triton", "dequant"), "int4-lr": ("auto",),
           "gguf_linear": ("torch", "triton")}
LOWRANK = 32
QTYPES = {"qmatmul": ("int8", "fp8", "int4"), "w8a8": ("int8", "fp8"), "gguf_linear": ("Q8_0", "Q4_K")}
MARGIN = 0.97  # a non-default choice must be at least 3% faster to replace the default


def layer_shape(ctx) -> tuple[int, int, tuple[int, ...]]:
    """(N, K, token counts): 1024² is 4096 image tokens + text; CFG doubles it."""
    if ctx.tiny:
        return 64, 128, (4, 32)
    return 16384, 6144, (64, 512, 2048, 4160, 8320)


@contextlib.contextmanager
def forced_choice(ctx, kernel: str, qtype: str, choice: str):
    """Make `auto` (or the backend) take `choice` for this kernel on this GPU, for the duration."""
    from krea2_lite.kernels import tuning

    if choice == "triton":
        with kernels_backend("triton"):
            yield
        return
    table = {"format": tuning.FORMAT, "version": tuning.VERSION, "gpus": {}}
    if choice != "torch" and ctx.device.type == "cuda":
        table["gpus"][torch.cuda.get_device_name(ctx.device)] = {kernel: {qtype: [[0, choice]]}}
    path = ctx.tmp / f"tuning-{kernel}-{qtype}-{choice}.json"
    path.write_text(json.dumps(table))
    old = os.environ.get("KREA2_LITE_TUNING")
    os.environ["KREA2_LITE_TUNING"] = str(path)
    try:
        with kernels_backend("auto"):
            yield
    finally:
        if old is None:
            os.environ.pop("KREA2_LITE_TUNING", None)
        else:
            os.environ["KREA2_LITE_TUNING"] = old


def _time(ctx, fn) -> float:
    """CUDA: the median of many event-timed calls after 3 warm-ups; CPU (a dry run): the minimum."""
    if ctx.device.type == "cuda":
        return statistics.median(time_ms(fn, ctx.device, max(10, ctx.repeats * 5), warmup=3))
    return min(time_ms(fn, ctx.device, max(1, ctx.repeats), warmup=1))


def _layer_fns(ctx, N: int, K: int):
    """{(kernel, qtype): fn(x) through the dispatch}, and the bf16 baseline."""
    from krea2_lite import kernels
    from krea2_lite.quantize.qlinear import quantize_weight_tensors

    g = torch.Generator().manual_seed(5)
    w = (torch.randn(N, K, generator=g) * 0.02).to(ctx.device)  # quantized on the device (fast at full size)
    fns = {("bf16", "bf16"): (lambda x, wd=w.to(ctx.device, ctx.dtype): F.linear(x, wd))}
    for qtype in QTYPES["qmatmul"]:
        group = 128 if qtype == "int4" else None
        q, s, sh = (None if t is None else t.to(ctx.device) for t in quantize_weight_tensors(w, qtype, group, ctx.dtype))
        fns[("qmatmul", qtype)] = (lambda x, a=(q, s, sh, qtype, group, N, K): kernels.qmatmul(x, *a))
    for qtype in QTYPES["w8a8"]:
        q, s, _ = (None if t is None else t.to(ctx.device) for t in quantize_weight_tensors(w, qtype, None, ctx.dtype))
        fns[("w8a8", qtype)] = (lambda x, a=(q, s, None, qtype): kernels.w8a8_linear(x, *a))
    fns[("int4-lr", f"int4-lr{LOWRANK}")] = _lowrank_layer(ctx, w, N, K)
    from benchmarks.gpu_proof.kernel_checks import _gguf_blocks

    # GGUF community files (issue 25); random valid blocks: the cost does not depend on the values.
    for qtype in [t for t in QTYPES["gguf_linear"] if K % (256 if t == "Q4_K" else 32) == 0]:
        q = _gguf_blocks(qtype, N, K).to(ctx.device)
        fns[("gguf_linear", qtype)] = (lambda x, q=q, qtype=qtype: kernels.gguf_linear(x, q, qtype, N, K))
    return fns


def _lowrank_layer(ctx, w: torch.Tensor, N: int, K: int):
    """An int4-lr layer as a model holds it: int4 codes of `w` and a random rank-32 branch (its cost does
    not depend on its values), called as a module so the branch runs through the LoRA hook."""
    from krea2_lite.quantize.lowrank import LowRankQuantizedLinear
    from krea2_lite.quantize.qlinear import quantize_weight_tensors

    layer = LowRankQuantizedLinear(K, N, False, 128, LOWRANK, ctx.dtype, device="meta")
    layer.qdata, layer.scale, layer.shift = (t.to(ctx.device) for t in quantize_weight_tensors(w, "int4", 128, ctx.dtype))
    g = torch.Generator().manual_seed(6)
    layer.lowrank.up = (torch.randn(N, LOWRANK, generator=g) * 0.02).to(ctx.device, ctx.dtype)
    layer.lowrank.down = (torch.randn(LOWRANK, K, generator=g) * 0.02).to(ctx.device, ctx.dtype)
    return lambda x: layer(x)


def layer_rows(ctx, rec, section) -> None:
    """Every (kernel, type, choice) at every token count, while the section's time lasts."""
    from benchmarks.gpu_proof.record import describe
    from benchmarks.gpu_proof.timings import free

    N, K, tokens = layer_shape(ctx)
    try:
        fns = _layer_fns(ctx, N, K)
    except Exception as exc:  # noqa: BLE001
        rec.timing(kind="layer", case=f"layer {N}×{K}", system="krea2_lite", quant="-", ms=None, ok=False,
                   detail=f"setup failed: {describe(exc)}")
        return
    for M in tokens:
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(ctx.device, ctx.dtype)
        for (kernel, qtype), fn in fns.items():
            for choice in CHOICES.get(kernel, ("cublas",)):
                base = dict(kind="layer", case=f"layer {N}×{K} M={M}", system="krea2_lite", tokens=M,
                            kernel=kernel, choice=choice, backend=choice, quant="bf16" if kernel == "bf16" else qtype)
                if section.left() <= 0:
                    rec.timing(ms=None, ok=False, detail=section.why_not(0.1), **base)
                    continue
                try:
                    if kernel in ("bf16", "int4-lr"):  # no choice to force: cuBLAS / the user's default
                        with torch.no_grad():
                            ms = _time(ctx, lambda: fn(x))
                    else:
                        with forced_choice(ctx, kernel, qtype, choice), torch.no_grad():
                            ms = _time(ctx, lambda: fn(x))
                    rec.timing(ms=round(ms, 4), **base)
                except Exception as exc:  # noqa: BLE001
                    rec.timing(ms=None, ok=False, detail=describe(exc), **base)
                    free(ctx)
        del x
    del fns
    free(ctx)


def derive_entry(result: dict) -> dict:
    """The tuning-table entry for the GPU of a proof result: per kernel and type, the fastest choice at each
    measured token count among those whose correctness checks passed (a non-default choice must win by
    3%), as [min_tokens, choice] steps; above the largest measured token count the default applies."""
    checks = {c["name"]: c["ok"] for c in result.get("checks", [])}
    rows = [r for r in result.get("timings", []) if r.get("kind") == "layer" and r.get("ms") is not None]
    entry = {"capability": result.get("capability"), "measured": {
        "by": "python -m benchmarks.gpu_proof", "date": result.get("date"), "torch": result.get("torch"),
        "triton": result.get("triton"), "layer": rows[0]["case"].rsplit(" M=", 1)[0] if rows else None}}
    for kernel, qtypes in QTYPES.items():
        for qtype in qtypes:
            trusted = {"torch": True, "triton": checks.get(f"{kernel}/{qtype}/triton", False),
                       "dequant": checks.get(f"w8a8/{qtype}/dequant", False)}
            if kernel == "w8a8":
                trusted["triton"] = trusted["triton"] and checks.get(f"w8a8/{qtype}/rot/triton", False)
            steps = []
            for M in sorted({r["tokens"] for r in rows}):
                times = {r["choice"]: r["ms"] for r in rows if r["kernel"] == kernel and r["quant"] == qtype
                         and r["tokens"] == M and trusted.get(r["choice"])}
                if "torch" not in times:
                    continue
                best = min(times, key=times.get)
                winner = best if times[best] < MARGIN * times["torch"] else "torch"
                if not steps or steps[-1][1] != winner:
                    steps.append([M if steps else 0, winner])
                largest = M
            if steps and steps[-1][1] != "torch":  # beyond the largest measured count: the default again
                steps.append([largest + 1, "torch"])
            if steps:
                entry.setdefault(kernel, {})[qtype] = steps
    return entry
