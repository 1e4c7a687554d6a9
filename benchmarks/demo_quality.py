"""Quantization quality on trained weights: the demo model at int8 / fp8 / int4 against fp32.

`python -m benchmarks.demo_quality` loads the shipped demo (`Krea2Pipeline.from_pretrained("demo")`)
once per row and generates the same images: --prompts held-out prompts (attribute tuples never
drawn in training, `krea2_lite.demo.dataset.held_out_prompts`) × --seeds seeds, at the folder's
default steps / CFG / 64×64, on the CPU, one batch per seed.

Rows. fp32: the reference (weights as stored, bf16, computed in float32). bf16: the same weights
computed in bfloat16 (transformer and text encoder; the VAE stays float32 on the CPU). int8 / fp8
/ int4: the transformer's block and text-fusion linears quantized at load (`quant=`, krea2_lite's
default recipe, int4 groups of 128), activations in float32. W8A8 is listed when this checkout's
QuantSpec accepts it. int4-lr{r} (--lowrank-ranks): int4 with a rank-r bf16 correction per layer
(the demo's linears are only 128–384 wide, so r = 32 is a quarter of a 128-wide layer); the bytes
column is the transformer's weight bytes as the planner counts them (bf16 for unquantized layers).
--rows keeps only the rows whose name contains one of the given words (fp32 is always run).

Columns. PSNR (dB) and max |pixel error| (0–255) of each row's images against the fp32 images,
over all images at once (PSNR of the pooled MSE; inf when identical); then the share of images in
which the hand-written classifier (`krea2_lite.demo.classifier`: background plane from the border,
shape = pixels far from it) reads the prompt's background colour, the shape's colour, its
position, both of those, and the shape.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import time

import numpy as np
import torch

from krea2_lite.demo import classifier, dataset
from krea2_lite.pipeline import Krea2Pipeline

ROWS = {  # name: (dtype, quant)
    "fp32 (reference)": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8": (torch.float32, "int8"),
    "fp8": (torch.float32, "fp8"),
    "int4": (torch.float32, "int4"),
}


def w8a8_row():
    from krea2_lite.quantize import QuantSpec

    for name in ("w8a8", "int8-w8a8"):
        try:
            QuantSpec.parse(name)
            return {"int8 W8A8": (torch.float32, name)}
        except (ValueError, TypeError):
            continue
    return {}


def lowrank_rows(ranks: list[int]) -> dict:
    return {f"int4-lr{r}": (torch.float32, f"int4-lr{r}") for r in ranks}


def weight_bytes(pipe) -> int:
    from krea2_lite.offload.sizes import module_bytes

    return module_bytes(pipe.transformer, torch.bfloat16)


def generate(dtype, quant, prompts: list[str], seeds: list[int]) -> tuple[list[np.ndarray], float]:
    pipe = Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=dtype, quant=quant, progress=False)
    images, start = [], time.perf_counter()
    for seed in seeds:
        out = pipe(prompts, seed=seed, progress=False)  # prompt i uses seed (one image each)
        images += [np.asarray(im, dtype=np.int16) for im in out.images]
    return images, time.perf_counter() - start, weight_bytes(pipe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lowrank-ranks", type=int, nargs="*", default=[8, 16, 32])
    parser.add_argument("--rows", nargs="*", help="only rows whose name contains one of these (fp32 always)")
    args = parser.parse_args(argv)
    rows = dict(ROWS, **w8a8_row(), **lowrank_rows(args.lowrank_ranks))
    if args.rows:
        rows = {k: v for k, v in rows.items() if k.startswith("fp32") or any(w in k for w in args.rows)}
    run(rows, args.prompts, args.seeds, args.threads)
    return 0


def run(rows: dict, n_prompts: int, seeds: list[int], threads: int) -> None:
    """Generate and print the table. rows: {name: (dtype, quant) or (dtype, quant, context)}, where
    `context()` is a context manager the row's model is loaded in (benchmarks/int4_rounding.py)."""
    torch.set_num_threads(threads)
    scenes = dataset.held_out_prompts(n_prompts)
    prompts = [s.caption() for s in scenes]
    truth = scenes * len(seeds)
    reference = None
    for name, (dtype, quant, *context) in rows.items():  # the fp32 reference is the first row
        with (context[0]() if context else contextlib.nullcontext()):
            images, seconds, size = generate(dtype, quant, prompts, seeds)
        readings = [classifier.classify(im.astype(np.uint8)) for im in images]
        if reference is None:
            reference = np.stack(images).astype(np.float64)
            print(f"\nDemo model quality — {len(prompts)} held-out prompts × seeds {seeds} = {len(reference)} "
                  f"images, 64×64, CPU ({platform.processor() or platform.machine()}, {threads} thread(s)), "
                  f"torch {torch.__version__}\n")
            print("| weights | PSNR vs fp32 (dB) | max pixel error | background | shape colour | position "
                  "| colour + position | shape | time (s) | transformer bytes |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(table_row(name, images, reference, readings, truth, seconds, size), flush=True)


def table_row(name, images, reference, readings, truth, seconds, size) -> str:
    got = np.stack(images).astype(np.float64)
    mse = float(((got - reference) ** 2).mean())
    psnr = "inf" if mse == 0 else f"{10 * math.log10(255 ** 2 / mse):.1f}"
    err = int(np.abs(got - reference).max())
    share = lambda check: sum(r.agrees(s, check) for r, s in zip(readings, truth)) / len(truth)  # noqa: E731
    return (f"| {name} | {psnr} | {err} | {share(('background',)):.0%} | {share(('colour',)):.0%} | "
            f"{share(('position',)):.0%} | {share(('colour', 'position')):.0%} | {share(('shape',)):.0%} | "
            f"{seconds:.1f} | {size:,} |")

if __name__ == "__main__":
    raise SystemExit(main())
