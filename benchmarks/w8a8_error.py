"""W8A8 error with and without the Hadamard rotation (CPU, torch reference kernels, random weights).

  linears  relative L2 error of one full-width linear's output vs fp32: the 6144×6144 attention
           projection and the MLP down projection (in 16384 → out 6144), --tokens tokens of N(0, 1)
           activations, plain and with --outliers channels multiplied by --outlier-scale
  block    one full-width Krea 2 block (all seven linears quantized), --tokens tokens, residual
           stream N(0, 1) plain and with outlier channels; relative L2 error of the block's
           residual update (output − input), which is what quantization perturbs
  tiny     relative L2 error of a whole tiny transformer's output vs its fp32 output, plain and
           with outlier channels injected into the residual stream (rows of the input projection
           `first` scaled by --outlier-scale)

    python -m benchmarks.w8a8_error                      # linears + tiny, full width (minutes on 2 cores)
    python -m benchmarks.w8a8_error --what block         # one full-width block (~2 GB RAM, slower)
    python -m benchmarks.w8a8_error --what tiny --json out.json
    python -m benchmarks.w8a8_error --width 512 --hidden 1024   # quick check at small width

Rows: weight-only int8 (reference point), int8 W8A8, int8 W8A8 + rotation (block 128), fp8 W8A8,
fp8 W8A8 + rotation. Everything runs in fp32 with KREA2_LITE_KERNELS=torch, so the numbers are the
quantization error alone (the Triton kernels reproduce the references; tests/kernels/test_w8a8.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["KREA2_LITE_KERNELS"] = "torch"

import torch

from krea2_lite import Krea2Config, Krea2Transformer, QuantSpec, load_transformer
from krea2_lite.quantize import QuantizedLinear

VARIANTS = {  # label -> QuantSpec
    "int8 weight-only": QuantSpec("int8"),
    "int8 W8A8": QuantSpec("int8", activations="int8"),
    "int8 W8A8 + rotation": QuantSpec("int8", activations="int8", rotate=128),
    "fp8 W8A8": QuantSpec("fp8", activations="fp8"),
    "fp8 W8A8 + rotation": QuantSpec("fp8", activations="fp8", rotate=128),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def with_outliers(x: torch.Tensor, count: int, scale: float, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    x[..., torch.randperm(x.shape[-1], generator=g)[:count]] *= scale
    return x


def linear_errors(args) -> list[dict]:
    rows = []
    shapes = {"attention projection": (args.width, args.width), "mlp down": (args.hidden, args.width)}
    for layer, (K, N) in shapes.items():
        g = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(K, N, bias=False)
        with torch.no_grad():
            linear.weight.normal_(0.0, 0.02, generator=g)
        x_plain = torch.randn(args.tokens, K, generator=g)
        inputs = {"plain": x_plain,
                  f"{args.outliers} outlier channels ×{args.outlier_scale:g}":
                      with_outliers(x_plain, args.outliers, args.outlier_scale)}
        refs = {name: linear(x).detach() for name, x in inputs.items()}
        for label, spec in VARIANTS.items():
            t = time.time()
            q = QuantizedLinear.from_linear(linear, spec.dtype, None, torch.float32, spec.activations,
                                            spec.rotate_for(K))
            with torch.no_grad():
                errs = {name: rel_err(q(x), refs[name]) for name, x in inputs.items()}
            rows.append(dict(what="linear", layer=f"{layer} {N}×{K}", tokens=args.tokens, variant=label,
                             **errs, seconds=round(time.time() - t, 1)))
            print(f"  {rows[-1]}", file=sys.stderr)
    return rows


def block_errors(args) -> list[dict]:
    from krea2_lite.model.transformer import SingleStreamBlock

    cfg = Krea2Config.krea2()
    if args.width != cfg.features:  # a narrower block with the released head size (quick checks)
        cfg = cfg.replace(features=args.width, heads=args.width // 128, kvheads=max(1, args.width // 512))
    torch.manual_seed(0)
    block = SingleStreamBlock(cfg).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0.0, 0.1 if name.endswith((".scale", ".lin")) else 0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.tokens, cfg.features, generator=g)
    inputs = {"plain": x, f"{args.outliers} outlier channels ×{args.outlier_scale:g}":
              with_outliers(x, args.outliers, args.outlier_scale)}
    vec = torch.randn(1, 1, 6 * cfg.features, generator=g) * 0.1
    angles = torch.rand(1, args.tokens, cfg.headdim // 2, generator=g)
    rope = (torch.cos(angles), torch.sin(angles))
    with torch.no_grad():
        refs = {name: block(xi, vec, rope) - xi for name, xi in inputs.items()}
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = []
    for label, spec in VARIANTS.items():
        t = time.time()
        for name, linear in linears.items():
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent), leaf, QuantizedLinear.from_linear(
                linear, spec.dtype, None, torch.float32, spec.activations, spec.rotate_for(linear.in_features)))
        with torch.no_grad():
            errs = {name: rel_err(block(xi, vec, rope) - xi, refs[name]) for name, xi in inputs.items()}
        for name, linear in linears.items():  # back to the float layers for the next variant
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent), leaf, linear)
        rows.append(dict(what="block", layer=f"block update, width {cfg.features}", tokens=args.tokens,
                         variant=label, **errs, seconds=round(time.time() - t, 1)))
        print(f"  {rows[-1]}", file=sys.stderr)
    return rows


def tiny_errors(args) -> list[dict]:
    cfg = Krea2Config.tiny(features=256, heads=2, kvheads=1, txtdim=128, txtheads=2, txtkvheads=2)
    torch.manual_seed(0)
    model = Krea2Transformer(cfg).eval()
    with torch.no_grad():  # variance-preserving weights, so every block changes the residual stream
        for name, p in model.named_parameters():
            if name.endswith((".scale", ".lin")):
                p.normal_(0.0, 0.3)
            elif p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    g = torch.Generator().manual_seed(1)
    txt, rows_, cols = 8, 8, 8
    img = torch.randn(1, rows_ * cols, cfg.channels * cfg.patch ** 2, generator=g)
    context = torch.randn(1, txt, cfg.txtlayers, cfg.txtdim, generator=g)
    t = torch.tensor([0.6])
    grid = torch.stack(torch.meshgrid(torch.arange(rows_), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    pos = torch.cat([torch.zeros(txt, 3), torch.cat([torch.zeros(rows_ * cols, 1), grid.float()], 1)])[None]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        states = {"plain": {k: v.contiguous() for k, v in model.state_dict().items()}}
        boosted = dict(states["plain"])
        channels = torch.randperm(cfg.features, generator=g)[:args.outliers]
        for key in ("first.weight", "first.bias"):
            boosted[key] = boosted[key].clone()
            boosted[key][channels] *= args.outlier_scale
        states[f"{args.outliers} outlier channels ×{args.outlier_scale:g}"] = boosted
        errs: dict[str, dict[str, float]] = {label: {} for label in VARIANTS}
        from safetensors.torch import save_file

        for name, state in states.items():
            path = Path(tmp) / "model.safetensors"
            save_file(state, str(path))
            with torch.no_grad():
                ref = load_transformer(path, dtype=torch.float32)(img, context, t, pos)
                for label, spec in VARIANTS.items():
                    q = load_transformer(path, dtype=torch.float32, quant=spec, progress=False)
                    errs[label][name] = rel_err(q(img, context, t, pos), ref)
        for label in VARIANTS:
            out.append(dict(what="tiny", layer=f"tiny transformer (width {cfg.features}, {cfg.layers} blocks)",
                            tokens=txt + rows_ * cols, variant=label, **errs[label]))
    return out


def print_table(rows: list[dict]) -> None:
    conditions = [k for k in rows[0] if k not in ("what", "layer", "tokens", "variant", "seconds")]
    print("\n| layer | tokens | variant | " + " | ".join(conditions) + " |")
    print("|---|---:|---|" + "---:|" * len(conditions))
    for r in rows:
        cells = " | ".join(f"{100 * r[c]:.3f}%" for c in conditions)
        print(f"| {r['layer']} | {r['tokens']} | {r['variant']} | {cells} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", nargs="+", choices=["linears", "block", "tiny"], default=["linears", "tiny"])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--width", type=int, default=6144, help="model width (the released 6144)")
    p.add_argument("--hidden", type=int, default=16384, help="MLP hidden width (the released 16384)")
    p.add_argument("--outliers", type=int, default=8, help="outlier channels to inject")
    p.add_argument("--outlier-scale", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if "tiny" in args.what:
        rows += tiny_errors(args)
        print_table([r for r in rows if r["what"] == "tiny"])
    for what, fn in (("linears", linear_errors), ("block", block_errors)):
        if what in args.what:
            new = fn(args)
            print_table(new)
            rows += new
    print(f"\nrelative L2 error vs fp32 (CPU, torch {torch.__version__}, random weights N(0, 0.02) for the "
          "linears, N(0, 1/in_features) for the tiny model)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
