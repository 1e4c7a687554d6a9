"""Streamed vs resident transformer step under a simulated consumer-card memory cap.

The transformer (random weights at `--preset`, bf16 or quantized; random weights cost what real
ones do) is built in host memory. Baseline: every block resident on the GPU, no cap. Then the
process's CUDA memory is capped with `torch.cuda.set_per_process_memory_fraction` to `--cap-gb`,
`krea2_lite.offload.plan_memory` chooses the streamed blocks for that cap, and the same step runs
with those blocks streamed from pinned host memory (prefetch `--prefetch`). One step = one CFG
forward (batch 2) at `--resolution`, `--text-tokens` compacted text tokens; medians of `--repeats`
after a warm-up, baseline and streamed measured in the same process. Goal: streamed ≤ 1.15×.

  python -m benchmarks.bench_offload --quant int8 --cap-gb 12
  python -m benchmarks.bench_offload --quant none --cap-gb 16 24
  python -m benchmarks.bench_offload --device cpu --preset tiny --resolution 128   # smoke run, every block streamed

Without CUDA (and no explicit --device cpu) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys


import torch

from benchmarks.common import PRESETS, time_ms
from krea2_lite import Krea2Config, QuantSpec
from krea2_lite.offload import plan_memory
from krea2_lite.offload.block_streamer import BlockStreamer
from krea2_lite.offload.swap import move_module
from krea2_lite.sampling import positions

GiB = 1 << 30


def build_host_model(cfg: Krea2Config, quant: str, dtype: torch.dtype):
    """Random weights in host memory, with the loader's dtype policy (and quantized when asked)."""
    from benchmarks.quantized_step import build

    if quant == "none":
        from benchmarks.transformer_step import build_models

        return build_models(cfg, torch.device("cpu"), dtype, with_peer=False)[0]
    return build(cfg, QuantSpec(quant), torch.device("cpu"), dtype)


def time_steps(model, inputs, repeats: int, device: torch.device) -> float:
    with torch.no_grad():  # one warm-up call: kernel compilation, allocator
        return statistics.median(time_ms(lambda: model(*inputs), device, repeats, warmup=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--quant", choices=["none", "int8", "fp8", "int4"], default="int8")
    ap.add_argument("--cap-gb", type=float, nargs="+", default=[12.0], help="simulated card sizes, GiB")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu (smoke run, no cap)")
    args = ap.parse_args()
    if args.device is None and not torch.cuda.is_available():
        print("benchmarks.bench_offload: needs a CUDA GPU (pass --device cpu for a smoke run); skipping")
        return 0
    device = torch.device(args.device or "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = PRESETS[args.preset]
    spec = None if args.quant == "none" else args.quant
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    model = build_host_model(cfg, args.quant, dtype)
    side = args.resolution // 16
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, side * side, cfg.in_channels, generator=g).to(device, dtype),
              torch.randn(2, args.text_tokens, cfg.txtlayers, cfg.txtdim, generator=g).to(device, dtype),
              torch.full((2,), 0.5).to(device, dtype),
              positions(args.text_tokens, side, side, device=device)]

    move_module(model, device)
    resident_ms = time_steps(model, inputs, args.repeats, device)
    reference = model(*inputs).float().cpu() if args.preset != "full" else None
    move_module(model, torch.device("cpu"))
    print(f"{name} · {args.preset} · {args.quant} · {args.resolution}² CFG batch 2 · {args.text_tokens} text tokens · "
          f"prefetch {args.prefetch} · medians of {args.repeats}")
    print("| cap GiB | resident blocks | streamed | peak allocated GiB | step ms | resident step ms | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for cap in args.cap_gb:
        # On the CPU there is no card to cap: stream every block, to exercise the path.
        plan = plan_memory(cfg, spec, cap if device.type == "cuda" else None, args.resolution, args.resolution,
                           dtype=dtype, cfg=True, max_sequence_length=args.text_tokens, text_encoder_bytes=0,
                           prefetch=args.prefetch, mode="auto" if device.type == "cuda" else "sequential")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / total), device)
            torch.cuda.reset_peak_memory_stats(device)
        streamer = None
        streamed = tuple(f"blocks.{i}" for i in plan.streamed_blocks)
        if plan.streamed_blocks:
            streamer = BlockStreamer(model, model.blocks, plan.streamed_blocks, device, args.prefetch)
        move_module(model, device, skip=streamed)
        ms = time_steps(model, inputs, args.repeats, device)
        if reference is not None:
            out = model(*inputs).float().cpu()
            assert torch.equal(out, reference), "streamed output differs from the resident one"
        peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else float("nan")
        print(f"| {cap:g} | {len(plan.resident_blocks)} | {len(plan.streamed_blocks)} | {peak:.2f} | {ms:.1f} | "
              f"{resident_ms:.1f} | {ms / resident_ms:.2f}× |", flush=True)
        if streamer is not None:
            streamer.close()
        move_module(model, torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
