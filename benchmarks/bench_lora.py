"""Memory and step time of a LoRA on a quantized Krea 2 transformer.

Builds the transformer at `--preset` with random weights, quantized layer by layer on the device
(as `quantized_step.py` does), writes a random rank-`--rank` LoRA over every block linear in the
kohya layout, loads it with `krea2_lite.lora.load_lora` and reports:
  LoRA MB        A and B of every layer in the activation dtype (`lora_bytes`)
  added MB       CUDA memory_allocated after − before load_lora (n/a on the CPU: no allocator counter)
  load peak MB   CUDA max_memory_allocated during load_lora − before (n/a on the CPU)
  unchanged      every quantized tensor has the same storage and values after load + forward
  step ms        one forward at `--resolution` (compacted text, no CFG) at LoRA scale 0 (the
                 branch skipped) and 1, alternated, median of `--repeats`

  python -m benchmarks.bench_lora --device cuda --preset full --dtype int8 --rank 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


import torch
from safetensors.torch import save_file

from krea2_lite import QuantSpec
from krea2_lite.lora import load_lora, lora_bytes, set_lora_scale
from krea2_lite.sampling import positions
from benchmarks.common import PRESETS, alternate
from benchmarks.quantized_step import build


def write_random_lora(model, rank: int, path: Path) -> None:
    """Kohya-layout LoRA over every linear of the transformer blocks (bf16, alpha = rank)."""
    tensors = {}
    for name, module in model.named_modules():
        if name.startswith("blocks.") and hasattr(module, "in_features"):
            flat = "lora_unet_" + name.replace(".", "_")
            tensors[f"{flat}.lora_down.weight"] = torch.randn(rank, module.in_features, dtype=torch.bfloat16) * 0.01
            tensors[f"{flat}.lora_up.weight"] = torch.randn(module.out_features, rank, dtype=torch.bfloat16) * 0.01
            tensors[f"{flat}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)


def step_times(model, inputs, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median forward ms at LoRA scale 0 (the branch skipped: the base model) and at scale 1,
    measured alternately so that load on a shared machine hits both alike."""
    def at(scale: float):
        def forward():
            set_lora_scale(model, scale)
            model(*inputs)
        return forward

    with torch.no_grad():
        model(*inputs)
        times = alternate({0.0: at(0.0), 1.0: at(1.0)}, device, repeats)
    return statistics.median(times[0.0]), statistics.median(times[1.0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["int8", "int4"], choices=["int8", "fp8", "int4"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = PRESETS[args.preset]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    side = args.resolution // 16
    rows = []
    print(f"| device | preset | quant | rank | LoRA MB | added MB | load peak MB | quantized unchanged | "
          f"step ms | step ms + LoRA |")
    print("|---|---|---|---:|---:|---:|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for qdtype in args.dtype:
            model = build(cfg, QuantSpec(qdtype), device, dtype)
            inputs = (torch.randn(1, side * side, cfg.in_channels, device=device, dtype=dtype),
                      torch.randn(1, args.text_tokens, cfg.txtlayers, cfg.txtdim, device=device, dtype=dtype),
                      torch.full((1,), 0.5, device=device, dtype=dtype),
                      positions(args.text_tokens, side, side, device=device))
            path = Path(tmp) / f"lora-{qdtype}.safetensors"
            write_random_lora(model, args.rank, path)
            quantized = {n: (b.data_ptr(), b.clone()) for n, b in model.named_buffers()
                         if n.endswith((".qdata", ".scale", ".shift")) and b is not None}
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            load_lora(model, path)
            added = peak = float("nan")
            if device.type == "cuda":
                torch.cuda.synchronize()
                added = (torch.cuda.memory_allocated() - before) / 1e6
                peak = (torch.cuda.max_memory_allocated() - before) / 1e6
            base_ms, lora_ms = step_times(model, inputs, args.repeats, device)
            buffers = dict(model.named_buffers())
            unchanged = all(buffers[n].data_ptr() == ptr and torch.equal(buffers[n], value)
                            for n, (ptr, value) in quantized.items())
            row = dict(device=name, preset=args.preset, quant=qdtype, rank=args.rank,
                       lora_mb=lora_bytes(model) / 1e6, added_mb=None if added != added else added,
                       load_peak_mb=None if peak != peak else peak,
                       quantized_unchanged=unchanged, step_ms=base_ms, lora_step_ms=lora_ms,
                       resolution=args.resolution, activation_dtype=str(dtype).removeprefix("torch."))
            rows.append(row)
            fmt = lambda v: "n/a" if v != v else f"{v:.1f}"  # noqa: E731 (NaN: not measurable here)
            print(f"| {name} | {args.preset} | {qdtype} | {args.rank} | {row['lora_mb']:.1f} | {fmt(added)} | "
                  f"{fmt(peak)} | {unchanged} | {base_ms:.1f} | {lora_ms:.1f} |", flush=True)
            del model, quantized, buffers
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["quantized_unchanged"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
