"""Step caching: block evaluations saved against image quality (demo model) and against wall time (CPU).

  python -m benchmarks.step_cache quality [--prompts 16] [--seeds 0] [--threads 1]
  python -m benchmarks.step_cache speed [--repeats 5] [--threads 2]

quality: the shipped demo model (trained, so its trajectory means something), fp32 on the CPU, a
Raw-like schedule (52 steps, CFG 3.5), one held-out prompt per call (batch = cond + uncond, as a
user's single image). Every row generates the same images; columns: share of block evaluations
saved, PSNR and max pixel error against the uncached images, the classifier's agreement with the
prompt (as benchmarks/demo_quality.py), and the share of decided steps on which the cond and uncond
halves, each judged alone, would have decided differently (the cost of sharing the decision).

speed: the random-weight medium preset (Krea2Config.medium) on the CPU, `sampling.denoise` with 52
steps and CFG at 256×256 (256 image tokens, 32 text tokens); uncached and cached runs alternated,
the minimum over repeats of each (CPU timings here are bimodal), and the saved fraction beside the
time ratio.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch

from benchmarks.common import PRESETS, time_one
from krea2_lite import Krea2Transformer
from krea2_lite.cache import attach_cache, parse_cache
from krea2_lite.sampling import TextBatch, denoise, sigmas

STEPS, GUIDANCE = 52, 3.5
QUALITY_ROWS = ("fbcache:0.05", "fbcache:0.1", "fbcache:0.15", "fbcache:0.2", "fbcache:0.3",
                "fbcache:0.1,max_skip=5", "fbcache:0.2,max_skip=5", "fbcache:0.3,max_skip=5",
                "taylor:1,threshold=0.1", "taylor:1,threshold=0.2", "taylor:1,threshold=0.2,max_skip=5",
                "taylor:2,threshold=0.1", "taylor:2,threshold=0.2")
CHECKS = (("background",), ("colour",), ("position",), ("colour", "position"), ("shape",))


# ---- quality on the demo model ---------------------------------------------------------------
def demo_images(pipe, prompts: list[str], seeds: list[int], spec) -> tuple[list[np.ndarray], dict]:
    """The images of every (seed, prompt), one prompt per call, with `spec` attached (None: uncached)."""
    images, ran, total, disagree, decided = [], 0, 0, 0, 0
    cache = attach_cache(pipe.transformer, spec, per_half=True) if spec is not None else None
    try:
        for seed in seeds:
            for prompt in prompts:
                if cache is not None:
                    cache.state.begin(STEPS)
                out = pipe(prompt, seed=seed, steps=STEPS, guidance=GUIDANCE, progress=False)
                images.append(np.asarray(out.images[0], dtype=np.int16))
                if cache is not None:
                    state = cache.state
                    ran, total = ran + state.evaluated, total + state.total
                    for cond, uncond in state.half_distances:
                        decided += 1
                        disagree += (cond < spec.threshold) != (uncond < spec.threshold)
    finally:
        if cache is not None:
            cache.remove()
    saved = 1 - ran / total if total else 0.0
    return images, dict(saved=saved, disagree=disagree / decided if decided else 0.0)


def quality(args) -> None:
    from krea2_lite.demo import classifier, dataset
    from krea2_lite.pipeline import Krea2Pipeline

    torch.set_num_threads(args.threads)
    scenes = dataset.held_out_prompts(args.prompts)
    prompts = [s.caption() for s in scenes]
    truth = scenes * len(args.seeds)
    pipe = Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False)
    rows = [None, *args.rows] if args.rows else [None, *QUALITY_ROWS]
    print(f"\nStep cache on the demo model — {len(prompts)} held-out prompts × seeds {args.seeds}, 64×64, "
          f"{STEPS} steps, CFG {GUIDANCE}, fp32, CPU ({platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s)), torch {torch.__version__}\n")
    print("| cache | blocks saved | PSNR vs uncached (dB) | max pixel error | background | shape colour | position "
          "| colour + position | shape | CFG halves disagree | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    reference = None
    for row in rows:
        spec = parse_cache(row)
        start = time.perf_counter()
        images, stats = demo_images(pipe, prompts, args.seeds, spec)
        seconds = time.perf_counter() - start
        got = np.stack(images).astype(np.float64)
        reference = got if reference is None else reference
        mse = float(((got - reference) ** 2).mean())
        psnr = "inf" if mse == 0 else f"{10 * math.log10(255 ** 2 / mse):.1f}"
        readings = [classifier.classify(im.astype(np.uint8)) for im in images]
        shares = [sum(r.agrees(s, c) for r, s in zip(readings, truth)) / len(truth) for c in CHECKS]
        print(f"| {row or 'none (uncached)'} | {stats['saved']:.1%} | {psnr} | {int(np.abs(got - reference).max())} | "
              + " | ".join(f"{x:.0%}" for x in shares) + f" | {stats['disagree']:.0%} | {seconds:.1f} |", flush=True)


# ---- wall time on the medium preset ------------------------------------------------------------
def speed(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    model = Krea2Transformer(cfg).eval()
    with torch.no_grad():  # random weights: the zero-initialised modulation tables too, so blocks do work
        for block in model.blocks:
            block.mod.lin.normal_(0, 0.1)
    side = args.resolution // 16
    noise = torch.randn(1, side * side, cfg.in_channels)
    text = TextBatch(torch.randn(1, 32, cfg.txtlayers, cfg.txtdim), None)
    uncond = TextBatch(torch.randn(1, 32, cfg.txtlayers, cfg.txtdim), None)
    schedule = sigmas(STEPS, 0.5)
    specs = [parse_cache(s) for s in args.specs]
    best = {s: math.inf for s in [None, *specs]}
    saved = {}

    def run(spec) -> float:
        cache = attach_cache(model, spec, steps=STEPS) if spec is not None else None
        with torch.no_grad():
            seconds = time_one(lambda: denoise(model, noise, text, schedule, guidance=GUIDANCE, uncond=uncond,
                                               rows=side, cols=side), "cpu") / 1e3
        if cache is not None:
            saved[spec] = cache.state.saved
            cache.remove()
        return seconds

    for repeat in range(args.repeats):
        for spec in best:
            best[spec] = min(best[spec], run(spec))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{s.name if s else 'none'} {t:.2f} s" for s, t in best.items()),
              flush=True)
    print(f"\nStep cache wall time — Krea2Config.{args.preset} (random weights, {cfg.layers} blocks), "
          f"{args.resolution}² "
          f"({side * side} image tokens), {STEPS} steps, CFG {GUIDANCE}, fp32, CPU "
          f"({platform.processor() or platform.machine()}, {args.threads} thread(s)); min of {args.repeats} "
          "alternated repeats\n")
    print("| cache | blocks saved | time (s) | time ratio cached/uncached | 1 − saved |")
    print("|---|---:|---:|---:|---:|")
    print(f"| none | 0% | {best[None]:.2f} | 1.00 | 1.00 |")
    for spec in specs:
        print(f"| {spec.name} | {saved[spec]:.1%} | {best[spec]:.2f} | {best[spec] / best[None]:.2f} | "
              f"{1 - saved[spec]:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="section", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--prompts", type=int, default=16)
    q.add_argument("--seeds", type=int, nargs="+", default=[0])
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--rows", nargs="*", help="cache specs to compare with uncached (default: the sweep)")
    s = sub.add_parser("speed")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--resolution", type=int, default=256)
    s.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    s.add_argument("--specs", nargs="+", default=["fbcache:0.1", "fbcache:0.2,max_skip=5"])
    args = parser.parse_args(argv)
    quality(args) if args.section == "quality" else speed(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
