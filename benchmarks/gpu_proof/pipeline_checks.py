"""Pipeline-level checks of the GPU proof, through the library paths users hit.

On a small random pipeline (tests/factories.py, saved with diffusers' save_pretrained and loaded with
`Krea2Pipeline.from_pretrained`): `sequential` block streaming (prefetch 1 and 2, every block through
the BlockStreamer's slots and copy stream) and `model` swapping (ModuleSwap) must give the bit-identical
image to `none`; a LoRA beside streaming the same image as without streaming; a CUDA memory cap
(`torch.cuda.set_per_process_memory_fraction`) that makes the resident plan run out of memory must
trigger exactly one re-plan and still give the same image. On the CPU (dry run) the out-of-memory
error is injected, since there is no allocator cap. Then a quantized folder written on the CPU by
`python -m krea2_lite.quantize` must load on the device with the same tensors and give the output of
quantizing on the fly there.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_proof.kernel_checks import rel_err

# On the GPU: big enough that the step's activations stand well above the allocator's rounding (the OOM
# check caps memory at half of them) and small enough to stay one VAE tile (64 latents) in every plan.
CALL = dict(width=384, height=384, steps=2, guidance=2.0, seed=3, max_sequence_length=32, progress=False)
PROMPTS = ["a red fox", "a cat"]
TINY_CALL = dict(CALL, width=32, height=32, steps=1)  # the CPU dry run: one prompt, one step


def pipeline_config(ctx):
    """Weights must dominate activations (as in the real model) for streaming and the cap to mean anything."""
    from benchmarks.builders import PIPELINE_CONFIG

    if ctx.tiny:
        return dataclasses.replace(PIPELINE_CONFIG, layers=4)
    return dataclasses.replace(PIPELINE_CONFIG, features=1024, heads=8, kvheads=2, layers=16)  # 0.5 GB bf16


def pipeline_folder(ctx) -> Path:
    folder = ctx.tmp / "pipeline"
    if not (folder / "model_index.json").exists():
        from benchmarks.builders import tiny_diffusers_pipeline

        tiny_diffusers_pipeline(transformer_config=pipeline_config(ctx)).save_pretrained(folder)
    return folder


def call_args(ctx) -> tuple[list[str], dict]:
    return (PROMPTS[:1], TINY_CALL) if ctx.tiny else (PROMPTS, CALL)


def generate(pipe, ctx):
    prompts, call = call_args(ctx)
    out = pipe(prompts, **call)
    return np.stack([np.asarray(im) for im in out.images]), out.latents.cpu()


def same(a, b) -> bool:
    return torch.equal(a[1], b[1]) and np.array_equal(a[0], b[0])


def _plan(pipe, ctx, mode: str, prefetch: int = 1):
    prompts, call = call_args(ctx)
    return pipe.plan(None, mode=mode, width=call["width"], height=call["height"], cfg=True, num_images=len(prompts),
                     prefetch=prefetch, max_sequence_length=call["max_sequence_length"])


class PipelineChecks:
    """One loaded pipeline shared by the checks (loading is most of their cost)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.pipe = None
        self.reference = None

    def load(self):
        from krea2_lite.pipeline import Krea2Pipeline

        if self.pipe is None:
            self.pipe = Krea2Pipeline.from_pretrained(pipeline_folder(self.ctx), device=self.ctx.device,
                                                      dtype=self.ctx.dtype, offload="none", progress=False)
            self.pipe.apply_plan(_plan(self.pipe, self.ctx, "none"), self.ctx.device)
            self.reference = generate(self.pipe, self.ctx)
        return self.pipe

    def restore(self):
        if self.pipe is not None:
            self.pipe.apply_plan(_plan(self.pipe, self.ctx, "none"), self.ctx.device)

    def offload(self, mode: str, prefetch: int = 1):
        pipe = self.load()
        try:
            pipe.apply_plan(_plan(pipe, self.ctx, mode, prefetch), self.ctx.device)
            plan = pipe.memory_plan
            streamer = pipe.offloader.streamer
            slots = min(prefetch + 1, pipe.transformer.config.layers)
            if mode == "sequential" and (streamer is None or len(streamer.device_flat) != slots):
                return False, f"expected every block streamed through {slots} slots, got plan:\n{plan}"
            got = generate(pipe, self.ctx)
        finally:
            self.restore()
        what = (f"{len(plan.streamed_blocks)} blocks streamed, prefetch {prefetch}" if mode == "sequential"
                else f"text encoder {plan.text_encoder}")
        equal = same(got, self.reference)
        return equal, f"{what}: image {'bit-identical' if equal else 'DIFFERS'} vs offload none"

    def lora(self):
        from benchmarks.bench_lora import write_random_lora

        pipe = self.load()
        path = self.ctx.tmp / "proof_lora.safetensors"
        write_random_lora(pipe.transformer, 4, path)
        name = pipe.load_lora(path, scale=12.0)
        try:
            resident = generate(pipe, self.ctx)
            pipe.apply_plan(_plan(pipe, self.ctx, "sequential"), self.ctx.device)
            streamed = generate(pipe, self.ctx)
        finally:
            self.restore()
            pipe.unload_lora(name)
        applied = not torch.equal(resident[1], self.reference[1])
        ok = applied and same(resident, streamed)
        return ok, (f"LoRA {'changes' if applied else 'does NOT change'} the image; streamed "
                    f"{'bit-identical' if same(resident, streamed) else 'DIFFERS'} vs resident")

    def oom(self):
        pipe = self.load()
        if self.ctx.device.type != "cuda":
            return self._injected_oom(pipe)
        device = self.ctx.device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        reference = generate(pipe, self.ctx)
        need = torch.cuda.max_memory_allocated(device) - base
        torch.cuda.empty_cache()
        # The cap binds new segments only: what is allocated now plus half of what the call needs, so the
        # resident plan runs out of memory and a plan that streams blocks fits.
        cap = base + need // 2
        total = torch.cuda.get_device_properties(device).total_memory
        try:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = generate(pipe, self.ctx)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            plan = pipe.memory_plan
            self.restore()
        replans = sum("retrying once with a smaller memory plan" in str(w.message) for w in caught)
        ok = replans == 1 and plan.mode != "none" and same(got, reference)
        return ok, (f"cap {cap / 2**20:.0f} MiB (step needs {need / 2**20:.0f} MiB above {base / 2**20:.0f} MiB): "
                    f"{replans} re-plan(s) → '{plan.mode}', {len(plan.streamed_blocks)} blocks streamed; image "
                    f"{'bit-identical' if same(got, reference) else 'DIFFERS'}")

    def _injected_oom(self, pipe):
        block = pipe.transformer.blocks[0]
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected: no allocator cap on the CPU)")
            return type(block).forward(block, *args, **kwargs)

        block.forward = flaky
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = generate(pipe, self.ctx)
        finally:
            del block.forward
            plan = pipe.memory_plan
            self.restore()
        replans = sum("retrying once with a smaller memory plan" in str(w.message) for w in caught)
        ok = replans == 1 and plan.mode != "none" and same(got, self.reference)
        return ok, (f"injected OOM (CPU dry run): {replans} re-plan(s) → '{plan.mode}', image "
                    f"{'bit-identical' if same(got, self.reference) else 'DIFFERS'}")


def folder_check(ctx, quant: str):
    """A folder quantized on the CPU by the CLI loads on ctx.device with equal tensors and equal output.
    bf16 throughout: the CLI writes bf16 scales, and quantizing on the fly must round them alike."""
    from safetensors.torch import save_file

    from benchmarks.builders import diffusers_transformer, official_state_dict, random_inputs
    from krea2_lite import Krea2Config, load_transformer
    from krea2_lite.cli.quantize import main as quantize_main

    cfg = Krea2Config.tiny(features=256, heads=8, kvheads=2, txtdim=128, txtheads=4, txtkvheads=4)
    src = ctx.tmp / "folder_src.safetensors"
    if not src.exists():
        save_file(official_state_dict(diffusers_transformer(cfg, seed=1)), src)
    out = ctx.tmp / f"folder_{quant}"
    weights, _, rest = quant.partition("-")
    argv = ["--model", str(src), "--dtype", weights, "--out", str(out), "--quiet", "--force"]
    if rest:
        argv += ["--activations", weights] + (["--rotate", "128"] if rest.endswith("rot") else [])
    if quantize_main(argv) != 0:
        return False, "python -m krea2_lite.quantize failed (see stderr)"
    dtype = torch.bfloat16
    on_cpu = load_transformer(out, device="cpu", dtype=dtype)
    on_dev = load_transformer(out, device=ctx.device, dtype=dtype)
    cpu_state = on_cpu.state_dict()
    differ = [k for k, v in on_dev.state_dict().items() if not torch.equal(v.cpu(), cpu_state[k])]
    img, context, t, pos = random_inputs(cfg, batch=2, txt_len=6, rows=4, cols=4)
    inputs = [img.to(dtype), context.to(dtype), t.to(dtype), pos]
    fly = load_transformer(src, device=ctx.device, dtype=dtype, quant=quant)
    with torch.no_grad():
        got = on_dev(*(x.to(ctx.device) for x in inputs))
        on_host = on_cpu(*inputs)  # the folder's own result on the CPU
        quantized_here = fly(*(x.to(ctx.device) for x in inputs))
    # Another device sums in another order (and quantizing W·H there may flip a code): bf16 tolerance, and
    # bit-identity reported where it holds.
    errs = {"the CPU": rel_err(got, on_host), f"quantizing on the fly on {ctx.device.type}": rel_err(got, quantized_here)}
    tol = 2e-2
    ok = not differ and all(e <= tol for e in errs.values())
    words = "; ".join(f"output vs {where}: {'bit-identical' if e == 0 else f'rel err {e:.1e}'}" for where, e in errs.items())
    return ok, f"{len(cpu_state)} tensors {'equal' if not differ else f'DIFFER ({differ[:3]})'} to the CPU load; {words} (tol {tol:.0e})"


def pipeline_checks(ctx):
    checks = PipelineChecks(ctx)
    yield "stream/prefetch1", lambda: checks.offload("sequential", 1)
    yield "stream/prefetch2", lambda: checks.offload("sequential", 2)
    yield "swap/model", lambda: checks.offload("model")
    yield "lora/stream", checks.lora
    yield "oom/replan", checks.oom
    for quant in ("int8", "int4", "int8-w8a8-rot"):
        yield f"folder/cpu-to-cuda/{quant}", lambda q=quant: folder_check(ctx, q)
