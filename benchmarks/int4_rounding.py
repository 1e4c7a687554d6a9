"""Data-free int4 rounding: min-max vs optimum-quanto's HQQ vs the MSE clip search (the default).

`python -m benchmarks.int4_rounding [--demo-images]` quantizes weights to int4 (groups of 128, bf16
scales, krea2_lite's `quantize_weight_tensors`) and prints each method's relative weight error
‖dequant(Q) − W‖/‖W‖ — which is also the expected relative output error for isotropic inputs —
and its quantization time, on:
  - the trained demo transformer's quantized linears (real trained weights, 128–384 wide),
  - structured 2048×2048 weights (krea2_lite.quantize.synthetic, as benchmarks/int4_lowrank.py),
  - i.i.d. Gaussian 2048×2048 weights,
  - one 16384×6144 Gaussian weight (the size of the 12.9B model's MLP layers: time only matters here);
with --demo-images, also the demo's images (benchmarks/demo_quality.py's PSNR and prompt agreement)
per method.

Methods (none sees data):
  minmax    scale = (max − min)/15, shift = −min per group (optimum-quanto's MaxOptimizer).
  hqq       optimum-quanto's HqqOptimizer (lp 0.7, beta 10, kappa 1.01, 20 iterations): half-quadratic
            search of the shift that minimises an lp (p < 1) norm of the error. Benchmark only.
  mse-clip  krea2_lite's default (`quantize/int4_rounding.py`): per group, the range [α·min, α·max]
            with α in 1.00, 0.98, …, 0.84 whose int4 rounding has the least squared error.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path

import torch
from optimum.quanto.tensor import optimizers
from optimum.quanto.tensor.packed import PackedTensor

from benchmarks import demo_quality
from krea2_lite.kernels.qmatmul_torch import dequantize_weight
from krea2_lite.quantize import QuantSpec, qlinear
from krea2_lite.quantize.synthetic import structured_weight

METHODS = ("minmax", "hqq", "mse-clip")


@contextlib.contextmanager
def rounding(method: str):
    """`hqq`: krea2_lite's int4 quantization with quanto's HqqOptimizer in place of the library's choice.

    PackedTensor.unpack is replaced by its plain-torch bit unpacking for the duration: HQQ dequantizes
    quanto tensors, which would otherwise compile quanto's C++ extension on first use. The library's
    own methods need no patch (`rounding=`); this context is then a no-op.
    """
    if method != "hqq":
        yield
        return
    saved = qlinear.int4_optimizer, PackedTensor.unpack
    qlinear.int4_optimizer = lambda _rounding, _scale_dtype: optimizers.HqqOptimizer()
    PackedTensor.unpack = lambda self: torch.cat([self._data & 0xF, self._data >> 4])[: self.shape[0]]
    try:
        yield
    finally:
        qlinear.int4_optimizer, PackedTensor.unpack = saved


def library_rounding(method: str) -> str:
    return "minmax" if method == "hqq" else method  # hqq: patched in by `rounding`


def weight_error(w: torch.Tensor, method: str) -> tuple[float, float, float]:
    """(‖dequant − W‖², ‖W‖², seconds) for int4 groups of 128 with `method`."""
    with rounding(method):
        start = time.process_time()
        q, s, sh = qlinear.quantize_weight_tensors(w, "int4", min(128, w.shape[1]), torch.bfloat16,
                                                   rounding=library_rounding(method))
        seconds = time.process_time() - start
    d = dequantize_weight(q, s, sh, "int4", *w.shape, torch.float32)
    return float((d - w).square().sum()), float(w.square().sum()), seconds


def demo_weights() -> list[torch.Tensor]:
    from safetensors.torch import load_file

    from krea2_lite.demo import __file__ as demo_init
    from krea2_lite.quantize.recipe import DEFAULT_INCLUDE

    state = load_file(Path(demo_init).parent / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    from krea2_lite.files.checkpoint import diffusers_to_official_key

    import fnmatch

    out = []
    for key, value in state.items():
        name = diffusers_to_official_key(key)
        quantized = any(fnmatch.fnmatchcase(name[:-len(".weight")], p) for p in DEFAULT_INCLUDE)
        if value.ndim == 2 and name.endswith(".weight") and quantized:
            out.append(value.float())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demo-images", action="store_true", help="also the demo's images per method (slow)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
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
            "structured 2048²": [structured_weight(2048, 2048, seed=s) for s in range(2)],
            "Gaussian 2048²": [torch.randn(2048, 2048, generator=g) for _ in range(2)],
            "Gaussian 16384×6144": [torch.randn(16384, 6144, generator=g)]}
    print(f"\nint4 (groups of 128, bf16 scales) relative weight error and CPU seconds to quantize, "
          f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}\n")
    print("| weights | " + " | ".join(METHODS) + " | " + " | ".join(f"{m} (s)" for m in METHODS) + " |")
    print("|---|" + "---:|" * (2 * len(METHODS)))
    for name, weights in sets.items():
        errors, times = [], []
        for method in METHODS:
            err, norm, seconds = map(sum, zip(*(weight_error(w, method) for w in weights)))
            errors.append(f"{(err / norm) ** 0.5:.4f}")
            times.append(f"{seconds:.2f}")
        print(f"| {name} ({len(weights)} matrices) | " + " | ".join(errors + times) + " |", flush=True)


def demo_rows(args) -> None:
    import functools

    rows = {"fp32 (reference)": (torch.float32, None)}
    rows.update({f"int4 {m}": (torch.float32, QuantSpec("int4", rounding=library_rounding(m)),
                               functools.partial(rounding, m)) for m in METHODS})
    rows.update({f"int4-lr{r} {m}": (torch.float32, QuantSpec("int4", lowrank=r, rounding=m))
                 for r in args.ranks for m in ("minmax", "mse-clip")})
    demo_quality.run(rows, args.prompts, args.seeds, args.threads)


if __name__ == "__main__":
    raise SystemExit(main())
