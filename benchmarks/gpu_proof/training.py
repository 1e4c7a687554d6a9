"""The `training` section: one LoRA training step (forward + backward + AdamW) at the proof's full shape
and resolution, resident, for int8 and int4 bases: ms per step, peak device memory, and the training
memory plan's estimate beside it (`krea2_lite.train.memory`); and one streamed step: int8 under
`torch.cuda.set_per_process_memory_fraction` for a 12 GiB card, the blocks the training plan streams
moved to the host and streamed forward and backward (`krea2_lite.train.streaming`). Each row is
time-boxed; a failure records the row ("not measured: ...") and moves on.
"""

from __future__ import annotations

import time

import torch

QUANTS = ("int8", "int4")
CASE = "LoRA train step (r16 attn+mlp, checkpointed)"


STREAMED_CARD_GIB = 12.0


def _one_step(model, lora, optimizer, inputs, device, streaming=None):
    import contextlib

    from krea2_lite.train.base_model import training_forward

    img, context, t, pos = inputs
    with training_forward(model, streaming=streaming), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                       enabled=device.type == "cuda"):
        loss = model(img, context, t, pos).float().square().mean()
    with streaming.backward() if streaming is not None else contextlib.nullcontext():
        loss.backward()
    torch.nn.utils.clip_grad_norm_(list(lora.parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _shapes(cfg):
    return ((cfg.features, cfg.features),) * 2 + ((cfg.features, cfg.kvheads * cfg.headdim),) * 2 + \
        ((cfg.features, cfg.features), (cfg.features, cfg.mlpdim), (cfg.features, cfg.mlpdim), (cfg.mlpdim, cfg.features))


def _timed_steps(ctx, model, lora, optimizer, inputs, streaming=None) -> list[float]:
    _one_step(model, lora, optimizer, inputs, ctx.device, streaming)  # warm-up
    times = []
    for _ in range(max(1, ctx.args.repeats if hasattr(ctx.args, "repeats") else 2)):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start = time.perf_counter()
        _one_step(model, lora, optimizer, inputs, ctx.device, streaming)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _streamed_row(ctx, quant: str):
    """One streamed step under a 12 GiB cap: (ms, peak GiB, planned GiB, streamed block count, copies/step)."""
    from benchmarks.gpu_proof.timings import build_model, free, step_inputs

    from krea2_lite.offload.swap import move_module
    from krea2_lite.train.base_model import freeze
    from krea2_lite.train.lora_params import TrainableLora, target_modules
    from krea2_lite.offload.planner import spread
    from krea2_lite.train.memory import check_fits
    from krea2_lite.train.streaming import StreamedTraining

    plan = check_fits(ctx.cfg, quant, vram_gb=STREAMED_CARD_GIB, rank=16, resolution=ctx.resolution, batch=1,
                      text_tokens=ctx.text_tokens, dtype=ctx.dtype, target_shapes=_shapes(ctx.cfg))
    # a small preset fits resident: stream half its blocks anyway, so that the path runs (the detail says so)
    streamed = plan.streamed_blocks or spread(max(1, ctx.cfg.layers // 2), ctx.cfg.layers)
    model, _ = build_model(ctx, quant)
    freeze(model)
    for i in streamed:
        move_module(model.blocks[i], torch.device("cpu"))
    free(ctx)
    cuda = ctx.device.type == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, STREAMED_CARD_GIB * 2**30 / total), ctx.device)
    streaming = None
    try:
        streaming = StreamedTraining(model, streamed, ctx.device)
        lora = TrainableLora(model, target_modules(model, ("attn", "mlp")), 16, 16.0, seed=0)
        lora.attach(ctx.device)
        optimizer = torch.optim.AdamW(list(lora.parameters()), lr=1e-4)
        inputs = step_inputs(ctx, 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        before = streaming.copies
        times = _timed_steps(ctx, model, lora, optimizer, inputs, streaming)
        copies = (streaming.copies - before) // (1 + len(times))
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None
        lora.detach_hooks()
    finally:
        if streaming is not None:
            streaming.close()
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        del model
        free(ctx)
    return min(times), peak, plan, streamed, copies


def _row(ctx, quant: str):
    from benchmarks.gpu_proof.timings import build_model, free, step_inputs

    from krea2_lite.train.base_model import freeze
    from krea2_lite.train.lora_params import TrainableLora, target_modules
    from krea2_lite.train.memory import training_plan

    model, _ = build_model(ctx, quant)
    freeze(model)
    lora = TrainableLora(model, target_modules(model, ("attn", "mlp")), 16, 16.0, seed=0)
    lora.attach(ctx.device)
    optimizer = torch.optim.AdamW(list(lora.parameters()), lr=1e-4)
    inputs = step_inputs(ctx, 1)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = _timed_steps(ctx, model, lora, optimizer, inputs)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None
    plan = training_plan(ctx.cfg, quant, rank=16, resolution=ctx.resolution, batch=1, text_tokens=ctx.text_tokens,
                         dtype=ctx.dtype, budget_bytes=None, target_shapes=_shapes(ctx.cfg))
    lora.detach_hooks()
    del model, lora, optimizer
    free(ctx)
    return min(times), peak, plan.total / 2**30


def run(ctx, rec, section) -> None:
    for quant in QUANTS:
        if not section.fits(60.0):
            rec.timing(case=CASE, system="krea2_lite resident", quant=quant, ms=None,
                       detail=f"not measured: {section.why_not(60.0)}")
            continue
        try:
            ms, peak, planned = _row(ctx, quant)
            detail = f"peak {peak:.3f} GiB, plan {planned:.3f} GiB" if peak is not None else f"plan {planned:.3f} GiB"
            rec.timing(case=CASE, system="krea2_lite resident", quant=quant, ms=ms, detail=detail)
        except Exception as exc:  # out of memory, a kernel error: this row only
            from benchmarks.gpu_proof.record import describe

            rec.timing(case=CASE, system="krea2_lite resident", quant=quant, ms=None, detail=f"failed: {describe(exc)}")
    _streamed(ctx, rec, section, "int8")


def _streamed(ctx, rec, section, quant: str) -> None:
    system = f"krea2_lite streamed ({STREAMED_CARD_GIB:g} GiB cap)"
    if not section.fits(90.0):
        rec.timing(case=CASE, system=system, quant=quant, ms=None, detail=f"not measured: {section.why_not(90.0)}")
        return
    try:
        ms, peak, plan, streamed, copies = _streamed_row(ctx, quant)
        detail = (f"plan {plan.total / 2**30:.3f} GiB, {len(streamed)} of {ctx.cfg.layers} blocks streamed, "
                  f"{copies} block copies per step")
        if peak is not None:
            detail = f"peak {peak:.3f} GiB, " + detail
        if not plan.streamed_blocks:
            detail += f" (the plan fits this preset resident under {STREAMED_CARD_GIB:g} GiB: half streamed anyway)"
        rec.timing(case=CASE, system=system, quant=quant, ms=ms, detail=detail)
    except Exception as exc:  # out of memory under the cap, a plan refusal: this row only
        from benchmarks.gpu_proof.record import describe

        rec.timing(case=CASE, system=system, quant=quant, ms=None, detail=f"not measured: {describe(exc)}")
