"""Data-free int4 rounding: min-max (krea2_lite's default) vs optimum-quanto's HQQ vs an MSE clip search.

`python benchmarks/int4_rounding.py [--demo-images]` quantizes weights to int4 (groups of 128, bf16
scales, krea2_lite's `quantize_weight_tensors` with quanto's optimizer swapped) and prints each
method's relative weight error ‖dequant(Q) − W‖/‖W‖ — which is also the expected relative output
error for isotropic inputs — on:
  - the trained demo transformer's quantized linears (real trained weights, 128–384 wide),
  - structured 2048×2048 weights (benchmarks/int4_lowrank.py's generator),
  - i.i.d. Gaussian 2048×2048 weights;
with --demo-images, also the demo's images (benchmarks/demo_quality.py's PSNR and prompt agreement)
per method.

Methods (none sees data):
  minmax    scale = (max − min)/15, shift = −min per group (quanto's MaxOptimizer; the default).
  hqq       optimum-quanto's HqqOptimizer (lp 0.7, beta 10, kappa 1.01, 20 iterations): half-quadratic
            search of the shift that minimises an lp (p < 1) norm of the error.
  mse-clip  per group, the range [α·min, α·max] with α in 1.00, 0.98, …, 0.70 whose int4 rounding has
            the least squared error (clipping a few extreme values buys finer steps for the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
from pathlib import Path

import torch
from optimum.quanto.tensor import optimizers
from optimum.quanto.tensor.packed import PackedTensor

from krea2_lite.kernels.qmatmul_torch import dequantize_weight
from krea2_lite.quantize import qlinear

ALPHAS = [1.0 - 0.02 * i for i in range(16)]


class MseClipOptimizer(optimizers.MaxOptimizer):
    """Per group the clipping ratio α with the least squared rounding error (grid ALPHAS)."""

    def optimize(self, base: torch.Tensor, qtype, axis: int):
        rmin = base.amin(dim=1, keepdim=True)
        rmax = base.amax(dim=1, keepdim=True)
        best_scale, best_shift, best_err = None, None, None
        for alpha in ALPHAS:
            scale = ((rmax - rmin) * alpha / 15).clamp_min(1e-12)
            shift = -rmin * alpha
            q = torch.clamp(torch.round((base + shift) / scale), 0, 15)
            err = (q * scale - shift - base).square().sum(dim=1, keepdim=True)
            if best_err is None:
                best_scale, best_shift, best_err = scale, shift, err
            else:
                better = err < best_err
                best_scale = torch.where(better, scale, best_scale)
                best_shift = torch.where(better, shift, best_shift)
                best_err = torch.where(better, err, best_err)
        return best_scale, best_shift


METHODS = {"minmax": optimizers.MaxOptimizer, "hqq": optimizers.HqqOptimizer, "mse-clip": MseClipOptimizer}


@contextlib.contextmanager
def rounding(method: str):
    """krea2_lite's int4 quantization with `method`'s optimizer in place of quanto's MaxOptimizer.

    PackedTensor.unpack is replaced by its plain-torch bit unpacking for the duration: HQQ dequantizes
    quanto tensors, which would otherwise compile quanto's C++ extension on first use.
    """
    saved = optimizers.MaxOptimizer, PackedTensor.unpack
    optimizers.MaxOptimizer = METHODS[method]  # qlinear imports it from this module at each call
    PackedTensor.unpack = lambda self: torch.cat([self._data & 0xF, self._data >> 4])[: self.shape[0]]
    try:
        yield
    finally:
        optimizers.MaxOptimizer, PackedTensor.unpack = saved


def weight_error(w: torch.Tensor, method: str) -> tuple[float, float]:
    """(‖dequant − W‖², ‖W‖²) for int4 groups of 128 with `method`."""
    with rounding(method):
        q, s, sh = qlinear.quantize_weight_tensors(w, "int4", min(128, w.shape[1]), torch.bfloat16)
    d = dequantize_weight(q, s, sh, "int4", *w.shape, torch.float32)
    return float((d - w).square().sum()), float(w.square().sum())


def demo_weights() -> list[torch.Tensor]:
    from safetensors.torch import load_file

    from krea2_lite.demo import __file__ as demo_init
    from krea2_lite.quantize.recipe import DEFAULT_INCLUDE

    state = load_file(Path(demo_init).parent / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    from krea2_lite.checkpoint import diffusers_to_official_key

    import fnmatch

    out = []
    for key, value in state.items():
        name = diffusers_to_official_key(key)
        quantized = any(fnmatch.fnmatchcase(name[:-len(".weight")], p) for p in DEFAULT_INCLUDE)
        if value.ndim == 2 and name.endswith(".weight") and quantized:
            out.append(value.float())
    return out


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demo-images", action="store_true", help="also the demo's images per method (slow)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--ranks", type=int, nargs="*", default=[], help="with --demo-images: int4-lr rows too")
    parser.add_argument("--skip-weights", action="store_true", help="only the demo images")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.skip_weights:
        weight_table()
    if args.demo_images:
        demo_rows(args)
    return 0


def weight_table() -> None:
    g = torch.Generator().manual_seed(0)
    sets = {"demo transformer (trained)": demo_weights(),
            "structured 2048²": [load_bench("int4_lowrank").structured_weight(2048, 2048, seed=s) for s in range(2)],
            "Gaussian 2048²": [torch.randn(2048, 2048, generator=g) for _ in range(2)]}
    print(f"\nint4 (groups of 128, bf16 scales) relative weight error, CPU ({platform.machine()}), "
          f"torch {torch.__version__}\n")
    print("| weights | " + " | ".join(METHODS) + " |")
    print("|---|" + "---:|" * len(METHODS))
    for name, weights in sets.items():
        row = []
        for method in METHODS:
            err, norm = map(sum, zip(*(weight_error(w, method) for w in weights)))
            row.append(f"{(err / norm) ** 0.5:.4f}")
        print(f"| {name} ({len(weights)} matrices) | " + " | ".join(row) + " |", flush=True)


def demo_rows(args) -> None:
    import functools

    quality = load_bench("demo_quality")
    rows = {"fp32 (reference)": (torch.float32, None)}
    rows.update({f"int4 {m}": (torch.float32, "int4", functools.partial(rounding, m)) for m in METHODS})
    rows.update({f"int4-lr{r} {m}": (torch.float32, f"int4-lr{r}", functools.partial(rounding, m))
                 for r in args.ranks for m in ("minmax", "mse-clip")})
    quality.run(rows, args.prompts, [0, 1], args.threads)


if __name__ == "__main__":
    raise SystemExit(main())
