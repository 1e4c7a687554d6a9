"""Timing sections of the GPU proof (benchmarks/gpu_proof/): one layer per token count (the data behind the `auto`
table), whole transformer steps per quantization and kernel backend (with diffusers' bf16 model as the
peer, sharing the weights), and streamed vs resident steps under simulated 12 / 16 GB cards.

Models are built as the other benchmarks build them (transformer_step.build_models, quantized_step.build:
random weights generated layer by layer on the device, quantized at once) and freed between rows.
Steps run under torch.no_grad(); each system gets `warmup` untimed calls (kernel compilation and
autotuning happen there), then the systems alternate for `repeats` timed calls; ms = median.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time

import torch

from benchmarks.common import time_one
from benchmarks.gpu_proof.kernel_checks import kernels_backend

STEP_QUANTS = ("bf16", "int8-w8a8", "int4", "int8", "fp8", "fp8-w8a8", "int8-w8a8-rot")
BACKENDS = ("auto", "triton")
BATCHES = (1, 2)
STREAM_CASES = (("int8", (12.0, 16.0)), ("int4", (8.0, 12.0, 16.0)), ("bf16", (16.0, 12.0)))
GiB = 1 << 30


def free(ctx) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


def build_model(ctx, quant: str, with_peer: bool = False):
    """(krea2_lite model, diffusers peer sharing its weights or None) on ctx.device."""
    from benchmarks.quantized_step import build
    from benchmarks.transformer_step import build_models

    from krea2_lite import QuantSpec

    if quant == "bf16":
        return build_models(ctx.cfg, ctx.device, ctx.dtype, with_peer)
    return build(ctx.cfg, QuantSpec.parse(quant), ctx.device, ctx.dtype), None


def step_inputs(ctx, batch: int):
    from benchmarks.transformer_step import make_inputs

    img, context, t, pos, _ = make_inputs(ctx.cfg, ctx.device, ctx.dtype, ctx.resolution, ctx.text_tokens,
                                          ctx.text_tokens, batch)
    return img, context, t, pos


def measure(ctx, systems: dict, warmup: int, repeats: int) -> dict:
    """{key: {"times": [...], "peak_gb"} or {"error"}}: warm-up per system, then systems alternate."""
    run = functools.partial(time_one, device=ctx.device)
    out = {}
    with torch.no_grad():
        for key, fn in systems.items():
            try:
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                    torch.cuda.reset_peak_memory_stats(ctx.device)
                for _ in range(warmup):
                    fn()
                peak = torch.cuda.max_memory_allocated(ctx.device) / 1e9 if ctx.device.type == "cuda" else None
                out[key] = {"times": [], "peak_gb": None if peak is None else round(peak, 2)}
            except Exception as exc:  # noqa: BLE001 - OOM, compile error: recorded, the others go on
                from benchmarks.gpu_proof.record import describe

                out[key] = {"error": describe(exc)}
                free(ctx)
        for _ in range(repeats):
            for key, fn in systems.items():
                if "error" in out[key]:
                    continue
                try:
                    out[key]["times"].append(run(fn))
                except Exception as exc:  # noqa: BLE001
                    from benchmarks.gpu_proof.record import describe

                    out[key] = {"error": describe(exc)}
                    free(ctx)
    return out


def summarize(result: dict) -> dict:
    if "error" in result:
        return {"ms": None, "ok": False, "detail": result["error"]}
    times = result["times"]
    return {"ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3), "repeats": len(times),
            "peak_gb": result.get("peak_gb")}


class Estimates:
    """Seconds a build or a timed row is expected to take, refined by what this run measured."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.step_s = {1: 0.5, 2: 1.0} if not ctx.tiny else {1: 0.3, 2: 0.5}
        self.build_s = 20.0 if not ctx.tiny else 2.0

    def row(self, batch: int, systems: int = 1) -> float:
        return systems * (self.ctx.warmup + self.ctx.repeats) * self.step_s[batch] * 1.5

    def learn_step(self, batch: int, ms: float | None) -> None:
        if ms:
            self.step_s[batch] = max(self.step_s[batch] * 0.5, ms / 1e3)

    def learn_build(self, seconds: float) -> None:
        self.build_s = max(seconds, 1.0)


def _step_case(ctx, batch: int) -> dict:
    return dict(kind="step", case=f"step {ctx.resolution}² b{batch}", batch=batch, resolution=ctx.resolution,
                text_tokens=ctx.text_tokens)


def _skip_steps(rec, ctx, quant: str, reason: str, batches=BATCHES, peer: bool = False) -> None:
    for batch in batches:
        for backend in BACKENDS:
            rec.timing(system="krea2_lite", quant=quant, backend=backend, ms=None, ok=False, detail=reason,
                       **_step_case(ctx, batch))
        if peer:
            rec.timing(system="diffusers", quant="bf16", backend="-", ms=None, ok=False, detail=reason,
                       **_step_case(ctx, batch))


def _forward(model, inputs, backend: str):
    def fn():
        with kernels_backend(backend):
            return model(*inputs)
    return fn


def step_rows(ctx, rec, section) -> None:
    """A transformer step per quantization × backend × batch (and diffusers bf16 beside bf16)."""
    est = ctx.estimates
    for quant in STEP_QUANTS:
        peer = quant == "bf16" and ctx.with_peer
        if not section.fits(est.build_s + est.row(1, 2)):
            _skip_steps(rec, ctx, quant, section.why_not(est.build_s + est.row(1, 2)), peer=peer)
            continue
        started = time.perf_counter()
        try:
            model, peer_model = build_model(ctx, quant, peer)
        except Exception as exc:  # noqa: BLE001
            from benchmarks.gpu_proof.record import describe

            _skip_steps(rec, ctx, quant, f"build failed: {describe(exc)}", peer=peer)
            free(ctx)
            continue
        est.learn_build(time.perf_counter() - started)
        try:
            for batch in BATCHES:
                _time_batch(ctx, rec, section, model, peer_model, quant, batch)
        finally:
            del model, peer_model
            free(ctx)


def _time_batch(ctx, rec, section, model, peer_model, quant: str, batch: int) -> None:
    est = ctx.estimates
    systems = {("krea2_lite", b): None for b in BACKENDS}
    if peer_model is not None:
        systems[("diffusers", "-")] = None
    if not section.fits(est.row(batch, len(systems))):
        _skip_steps(rec, ctx, quant, section.why_not(est.row(batch, len(systems))), (batch,), peer_model is not None)
        return
    inputs = step_inputs(ctx, batch)
    for backend in BACKENDS:
        systems[("krea2_lite", backend)] = _forward(model, inputs, backend)
    if peer_model is not None:
        img, context, t, pos = inputs
        systems[("diffusers", "-")] = lambda: peer_model(img, context, t, pos, encoder_attention_mask=None,
                                                         return_dict=False)
    results = measure(ctx, systems, ctx.warmup, ctx.repeats)
    for (system, backend), result in results.items():
        row = rec.timing(system=system, quant=quant, backend=backend, **summarize(result), **_step_case(ctx, batch))
        est.learn_step(batch, row["ms"])


def _stream_case(ctx, cap) -> dict:
    label = "resident, no cap" if cap is None else f"{cap:g} GiB card"
    return dict(kind="stream", case=f"step {ctx.resolution}² b2, {label}", batch=2, resolution=ctx.resolution,
                text_tokens=ctx.text_tokens, cap_gib=cap, system="krea2_lite", backend="auto")


def stream_rows(ctx, rec, section) -> None:
    """Streamed vs resident CFG steps (batch 2) under simulated cards, for int8, int4 and bf16."""
    est = ctx.estimates
    for quant, caps in STREAM_CASES:
        need = est.build_s + est.row(2) * (1 + len(caps)) + 10 * len(caps)  # + pinning the host copies
        if not section.fits(est.build_s + 2 * est.row(2)):
            for cap in (None, *caps):
                rec.timing(quant=quant, ms=None, ok=False, detail=section.why_not(need), **_stream_case(ctx, cap))
            continue
        try:
            model, _ = build_model(ctx, quant)
        except Exception as exc:  # noqa: BLE001
            from benchmarks.gpu_proof.record import describe

            for cap in (None, *caps):
                rec.timing(quant=quant, ms=None, ok=False, detail=f"build failed: {describe(exc)}",
                           **_stream_case(ctx, cap))
            free(ctx)
            continue
        try:
            inputs = step_inputs(ctx, 2)
            resident = rec.timing(quant=quant, **summarize(measure(ctx, {0: _forward(model, inputs, "auto")},
                                                                    ctx.warmup, ctx.repeats)[0]),
                                  **_stream_case(ctx, None))
            with torch.no_grad():
                reference = model(*inputs).cpu()
            for cap in caps:
                if not section.fits(est.row(2) + 10):
                    rec.timing(quant=quant, ms=None, ok=False, detail=section.why_not(est.row(2) + 10),
                               **_stream_case(ctx, cap))
                    continue
                _stream_cap(ctx, rec, model, inputs, quant, cap, resident, reference)
        finally:
            del model
            free(ctx)


def _stream_cap(ctx, rec, model, inputs, quant: str, cap: float, resident: dict, reference) -> None:
    from krea2_lite.errors import MemoryPlanError
    from krea2_lite.offload import plan_memory
    from krea2_lite.offload.block_streamer import BlockStreamer
    from krea2_lite.offload.swap import move_module
    from benchmarks.gpu_proof.record import describe

    cuda = ctx.device.type == "cuda"
    spec = None if quant == "bf16" else quant
    try:  # on the CPU there is no card to cap: every block streams, to exercise the path
        plan = plan_memory(ctx.cfg, spec, cap if cuda else None, ctx.resolution, ctx.resolution, dtype=ctx.dtype,
                           cfg=True, max_sequence_length=ctx.text_tokens, text_encoder_bytes=0, prefetch=1,
                           mode="auto" if cuda else "sequential")
    except MemoryPlanError as exc:
        rec.timing(quant=quant, ms=None, ok=False, detail=f"no plan: {str(exc).splitlines()[0]}",
                   **_stream_case(ctx, cap))
        return
    streamer = None
    try:
        if plan.streamed_blocks:
            streamer = BlockStreamer(model, model.blocks, plan.streamed_blocks, ctx.device, 1)
        free(ctx)
        if cuda:
            total = torch.cuda.get_device_properties(ctx.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / total), ctx.device)
        row = summarize(measure(ctx, {0: _forward(model, inputs, "auto")}, ctx.warmup, ctx.repeats)[0])
        with torch.no_grad():
            identical = torch.equal(model(*inputs).cpu(), reference)
        ratio = round(row["ms"] / resident["ms"], 3) if row["ms"] and resident.get("ms") else None
        row.update(ok=row["ms"] is not None and identical, ratio_to_resident=ratio,
                   streamed_blocks=len(plan.streamed_blocks), plan=plan.mode,
                   detail=(row.get("detail") or "") + f"{len(plan.resident_blocks)} resident / "
                   f"{len(plan.streamed_blocks)} streamed; output {'bit-identical' if identical else 'DIFFERS'} "
                   "vs resident")
        rec.timing(quant=quant, **row, **_stream_case(ctx, cap))
    except Exception as exc:  # noqa: BLE001
        rec.timing(quant=quant, ms=None, ok=False, detail=describe(exc), **_stream_case(ctx, cap))
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        if streamer is not None:
            streamer.close()
        move_module(model, ctx.device)
        free(ctx)
