"""The `training` section: one LoRA training step (forward + backward + AdamW) at the proof's full shape
and resolution, resident, for int8 and int4 bases: ms per step, peak device memory, and the training
memory plan's estimate beside it (`krea2_lite.train.memory`). Streamed training is not implemented
(each row's detail says so). Each row is time-boxed; a failure records the row and moves on.
"""

from __future__ import annotations

import time

import torch

QUANTS = ("int8", "int4")
CASE = "LoRA train step (r16 attn+mlp, checkpointed)"


def _one_step(model, lora, optimizer, inputs, device):
    from krea2_lite.train.base_model import training_forward

    img, context, t, pos = inputs
    with training_forward(model), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(img, context, t, pos).float().square().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(lora.parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
    _one_step(model, lora, optimizer, inputs, ctx.device)  # warm-up
    times = []
    for _ in range(max(1, ctx.args.repeats if hasattr(ctx.args, "repeats") else 2)):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start = time.perf_counter()
        _one_step(model, lora, optimizer, inputs, ctx.device)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None
    cfg = ctx.cfg
    shapes = ((cfg.features, cfg.features),) * 2 + ((cfg.features, cfg.kvheads * cfg.headdim),) * 2 + \
        ((cfg.features, cfg.features), (cfg.features, cfg.mlpdim), (cfg.features, cfg.mlpdim), (cfg.mlpdim, cfg.features))
    plan = training_plan(cfg, quant, rank=16, resolution=ctx.resolution, batch=1, text_tokens=ctx.text_tokens,
                         dtype=ctx.dtype, budget_bytes=None, target_shapes=shapes)
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
            detail += "; streamed training not measured (not implemented)"
            rec.timing(case=CASE, system="krea2_lite resident", quant=quant, ms=ms, detail=detail)
        except Exception as exc:  # out of memory, a kernel error: this row only
            from benchmarks.gpu_proof.record import describe

            rec.timing(case=CASE, system="krea2_lite resident", quant=quant, ms=None, detail=f"failed: {describe(exc)}")
