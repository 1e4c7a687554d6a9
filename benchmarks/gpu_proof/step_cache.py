"""GPU proof rows (section `cache`) for step caching (issue 27): cached vs uncached Raw steps, int8,
resident and streamed.

Random weights do not have a trained model's trajectory, so the cache's threshold is set so high that
every step the schedule allows is skipped (`CACHE_SPEC`): the rows measure what a skipped step costs
against a computed one on this card, resident and under a 12 GiB cap (streamed blocks), at the skip
pattern of a cached Raw run (the demo's measured quality is in benchmarks/RESULTS.md). ms = per step,
averaged over a sequence of CACHE_STEPS CFG steps (batch 2); "saved" = block evaluations not run;
"copies" = streamed blocks copied per sequence.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.gpu_proof.timings import build_model, free, measure, step_inputs, summarize

CACHE_STEPS = 8
CACHE_SPEC = "fbcache:10,warmup=1,tail=1,max_skip=3"  # skips 5 of 8 steps: 0 computed, 1-3 skipped, 4, 5-6, 7
CAP_GIB = 12.0
GiB = 1 << 30


def _case(ctx, where: str, cap) -> dict:
    return dict(kind="cache", case=f"{CACHE_STEPS} Raw steps {ctx.resolution}² b2, {where}", batch=2,
                resolution=ctx.resolution, text_tokens=ctx.text_tokens, cap_gib=cap, system="krea2_lite",
                backend="auto", quant="int8")


def _sequence(model, inputs, spec=None, gate=None, stats=None):
    from krea2_lite.cache import attach_cache

    img, context, t, pos = inputs

    def fn():
        cache = attach_cache(model, spec, gate=gate, steps=CACHE_STEPS) if spec is not None else None
        try:
            for i in range(CACHE_STEPS):
                out = model(img, context, torch.full_like(t, 1 - i / CACHE_STEPS), pos)
        finally:
            if cache is not None:
                cache.remove()
                if stats is not None:
                    stats["saved"] = cache.state.saved
        return out
    return fn


def _pair(ctx, rec, model, inputs, where: str, cap, streamer=None) -> None:
    from krea2_lite.cache import parse_cache

    stats = {}
    systems = {"uncached": _sequence(model, inputs),
               "cached": _sequence(model, inputs, parse_cache(CACHE_SPEC), streamer, stats)}
    copies = {}
    results = {}
    for key, fn in systems.items():  # one at a time, so the copy count belongs to one system
        before = streamer.copies if streamer is not None else 0
        results[key] = measure(ctx, {key: fn}, 1, ctx.repeats)[key]
        runs = 1 + len(results[key].get("times", []))
        copies[key] = ((streamer.copies - before) // runs) if streamer is not None else 0
    rows = {key: summarize(result) for key, result in results.items()}
    for key, row in rows.items():
        if row["ms"] is not None:
            row["ms"] = round(row["ms"] / CACHE_STEPS, 3)
            row["min_ms"] = round(row["min_ms"] / CACHE_STEPS, 3)
    base = rows["uncached"]["ms"]
    for key, row in rows.items():
        ratio = round(row["ms"] / base, 3) if row["ms"] and base else None
        saved = stats.get("saved", 0.0) if key == "cached" else 0.0
        detail = (row.get("detail") or "") + f"{key}, {CACHE_SPEC if key == 'cached' else 'no cache'}; " \
            f"{saved:.0%} of block evaluations saved; {copies[key]} block copies per {CACHE_STEPS} steps"
        rec.timing(**{**row, "detail": detail}, ratio_to_uncached=ratio, saved=round(saved, 3),
                   copies=copies[key], cache=key, **_case(ctx, where, cap))


def run(ctx, rec, section) -> None:
    """Cached vs uncached CFG step sequences, int8, resident then under a 12 GiB cap."""
    from krea2_lite.errors import MemoryPlanError
    from krea2_lite.offload import plan_memory
    from krea2_lite.offload.block_streamer import BlockStreamer
    from krea2_lite.offload.swap import move_module

    est = ctx.estimates
    # The dry run's learned step time includes the Triton interpreter's rows; these run the torch path.
    need = 60.0 if ctx.tiny else est.build_s + 4 * (1 + ctx.repeats) * CACHE_STEPS * est.step_s[2] * 1.5
    if not section.fits(need):
        for where, cap in (("resident", None), (f"{CAP_GIB:g} GiB card", CAP_GIB)):
            rec.timing(ms=None, ok=False, detail=section.why_not(need), **_case(ctx, where, cap))
        return
    cuda = ctx.device.type == "cuda"
    if ctx.cfg.layers < 2:  # the dry run's one-block model: a cache needs blocks after the first
        ctx = argparse.Namespace(**{**vars(ctx), "cfg": ctx.cfg.replace(layers=2)})
    model, _ = build_model(ctx, "int8")
    streamer = None
    try:
        inputs = step_inputs(ctx, 2)
        _pair(ctx, rec, model, inputs, "resident", None)
        try:
            plan = plan_memory(ctx.cfg, "int8", CAP_GIB if cuda else None, ctx.resolution, ctx.resolution,
                               dtype=ctx.dtype, cfg=True, max_sequence_length=ctx.text_tokens, text_encoder_bytes=0,
                               prefetch=1, mode="auto" if cuda else "sequential")
        except MemoryPlanError as exc:
            rec.timing(ms=None, ok=False, detail=f"no plan: {str(exc).splitlines()[0]}",
                       **_case(ctx, f"{CAP_GIB:g} GiB card", CAP_GIB))
            return
        if plan.streamed_blocks:
            streamer = BlockStreamer(model, model.blocks, plan.streamed_blocks, ctx.device, 1)
        free(ctx)
        if cuda:
            total = torch.cuda.get_device_properties(ctx.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GiB / total), ctx.device)
        _pair(ctx, rec, model, inputs, f"{CAP_GIB:g} GiB card ({len(plan.streamed_blocks)} streamed)", CAP_GIB,
              streamer)
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        if streamer is not None:
            streamer.close()
        move_module(model, ctx.device)
        del model
        free(ctx)
