"""A quantized transformer step under a simulated consumer-card memory budget.

Builds the model at `--preset` with random weights generated layer by layer on the device and
quantized at once (the float model never exists whole), caps the process's CUDA memory with
`torch.cuda.set_per_process_memory_fraction` to `--budget-gb`, and times one forward at
`--resolution` (compacted text, no CFG). Weight-only matmuls here are the plain-torch reference
path (dequantize, then cuBLAS); Triton kernels for them are separate work.

  python -m benchmarks.quantized_step --dtype int8 --budget-gb 16
"""

from __future__ import annotations

import argparse
import statistics
import sys


import torch

from benchmarks.common import PRESETS, time_ms
from krea2_lite import QuantSpec
from krea2_lite.quantize.skeleton import build_quantized_skeleton
from krea2_lite.quantize import QuantizedLinear
from krea2_lite.sampling import positions



def build(cfg, spec, device, dtype):
    model = build_quantized_skeleton(cfg, spec, dtype, log=False)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            w = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype).normal_(0, 0.02)
            module.set_weight(w)
            del w
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:
            target = torch.float32 if name.endswith((".scale", ".lin")) else dtype
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent)
            value = torch.empty(p.shape, device=device, dtype=target).normal_(0, 0.02)
            if leaf in owner._parameters:
                owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[leaf] = value
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["int8", "int4"], choices=["int8", "fp8", "int4"])
    ap.add_argument("--budget-gb", nargs="+", type=float, default=[16.0, 12.0], help="one per dtype")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = PRESETS[args.preset]
    print(f"| device | dtype | budget GB | weights GB | step ms (median of {args.repeats}) | peak allocated GB |")
    print("|---|---|---:|---:|---:|---:|")
    for qdtype, budget in zip(args.dtype, args.budget_gb):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 1e9 / total), device)
            torch.cuda.reset_peak_memory_stats()
        model = build(cfg, QuantSpec(qdtype), device, dtype)
        weights = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers())) / 1e9
        side = args.resolution // 16
        img = torch.randn(1, side * side, cfg.in_channels, device=device, dtype=dtype)
        ctx = torch.randn(1, args.text_tokens, cfg.txtlayers, cfg.txtdim, device=device, dtype=dtype)
        t = torch.full((1,), 0.5, device=device, dtype=dtype)
        pos = positions(args.text_tokens, side, side, device=device)
        with torch.no_grad():
            times = time_ms(lambda: model(img, ctx, t, pos), device, args.repeats, warmup=1)
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"| {name} | {qdtype} | {budget:g} | {weights:.2f} | {statistics.median(times):.1f} | {peak:.2f} |",
              flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
