"""`python -m benchmarks.train_lora [--steps N] [--rank R]`: does LoRA training teach the demo model a
made-up word? Trains on images of ONE demo scene (a large orange star at the bottom right on white)
captioned "a zorblat", then generates "a zorblat" with and without the LoRA and reads each image with
the demo classifier (colour + position of the shape), and the ordinary held-out prompts with and
without it (how much the LoRA costs them). Prints seconds per step and peak RSS of the training.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from krea2_lite.demo import classifier, dataset, demo_path

SCENE = dataset.Scene("orange", "star", "large", "at the bottom right", "white")
WORD = "a zorblat"


def write_data(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(dataset.render(SCENE, rng)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(WORD)


def agreement(pipe, prompts, scenes, seeds) -> float:
    hits = total = 0
    for seed in seeds:
        for image, scene in zip(pipe(prompts, seed=seed, progress=False).images, scenes):
            hits += classifier.classify(np.asarray(image)).agrees(scene)
            total += 1
    return hits / total


def evaluate(lora: Path, seeds: list[int], held: int) -> dict:
    from krea2_lite import Krea2Pipeline

    pipe = Krea2Pipeline.from_pretrained(str(demo_path()), device="cpu", dtype=torch.float32, progress=False)
    held_scenes = dataset.held_out_prompts(held)
    held_prompts = [s.caption() for s in held_scenes]
    out = {"word_before": agreement(pipe, [WORD], [SCENE], seeds),
           "held_before": agreement(pipe, held_prompts, held_scenes, seeds[:2])}
    pipe.load_lora(lora)
    out["word_after"] = agreement(pipe, [WORD], [SCENE], seeds)
    out["held_after"] = agreement(pipe, held_prompts, held_scenes, seeds[:2])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--held", type=int, default=16)
    parser.add_argument("--quant", default=None)
    args = parser.parse_args(argv)
    from krea2_lite.train import train_lora

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root / "data", args.images)
        out = root / "out" / "zorblat.safetensors"
        train_lora(str(demo_path()), data=root / "data", output=out, rank=args.rank, steps=1, lr=args.lr,
                   resolution=64, quant=args.quant, progress=False, log=lambda *a: None)  # fills the cache
        start = time.perf_counter()
        train_lora(str(demo_path()), data=root / "data", output=out, rank=args.rank, steps=args.steps, lr=args.lr,
                   resolution=64, quant=args.quant, progress=False, log=lambda *a: None)
        seconds = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"train: {args.steps} steps rank {args.rank} lr {args.lr} quant {args.quant}: {seconds:.1f} s "
              f"({seconds / args.steps:.3f} s/step incl. model load), peak RSS {rss:.0f} MiB, "
              f"{torch.get_num_threads()} threads", flush=True)
        result = evaluate(out, list(range(args.seeds)), args.held)
    print(f"'{WORD}' → orange star bottom right (colour+position): {result['word_before']:.0%} without the LoRA, "
          f"{result['word_after']:.0%} with it")
    print(f"held-out prompts (colour+position): {result['held_before']:.0%} without, {result['held_after']:.0%} with")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
