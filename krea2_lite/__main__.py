"""`python -m krea2_lite generate PROMPT --model …`: write PNGs and print their paths."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from .cli_errors import run_cli

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m krea2_lite", description="Krea 2 image generation")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", help="text prompt")
    gen.add_argument("--model", required=True,
                     help="diffusers pipeline folder, hub id (e.g. krea/Krea-2-Turbo), transformer .safetensors, "
                     "or demo (the trained miniature shipped with krea2_lite: 64×64 shapes, seconds on a CPU)")
    gen.add_argument("--text-encoder", help="Qwen3-VL folder or hub id (when --model is a single file)")
    gen.add_argument("--vae", help="Qwen-Image vae/ folder (when --model is a single file)")
    gen.add_argument("--variant", choices=["raw", "turbo"], help="sampling defaults (Raw: 52 steps, CFG 3.5; "
                     "Turbo: 8 steps, CFG 0, mu 1.15); default: from the checkpoint, else raw")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--cfg", type=float, help="guidance g in cond + g·(cond − uncond); 0 disables")
    gen.add_argument("--mu", type=float, help="pin the timestep shift instead of deriving it from the size")
    gen.add_argument("--width", type=int, help="default: the model's own (1024; the demo: 64)")
    gen.add_argument("--height", type=int, help="default: the model's own (1024; the demo: 64)")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--output", default="sample.png",
                     help="PNG path; with several images, _0, _1, … are added before the suffix")
    gen.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    gen.add_argument("--dtype", choices=sorted(DTYPES),
                     help="default bf16; fp32 for --model demo (tiny: CPUs without native bf16 run it ~3× slower)")
    gen.add_argument("--quant", choices=["int8", "fp8", "int4"], help="quantize the transformer while loading")
    gen.add_argument("--offload", choices=["auto", "none", "model", "sequential"], default="auto",
                     help="where weights live: auto plans from --vram-gb or the free GPU memory")
    gen.add_argument("--vram-gb", type=float, help="device memory budget in GiB for the offload planner")
    gen.add_argument("--ram-gb", type=float, help="host RAM in GiB the offload planner may use (host_ram_gb; "
                     "default: what the OS reports available)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="PATH[:SCALE]",
                     help="apply a LoRA .safetensors file, optionally with a scale (default 1); repeatable")
    return parser


# A trailing ":number" is the scale; any other ':' belongs to the path (C:\..., odd file names).
_LORA_SCALE = re.compile(r"^(?P<path>.+):(?P<scale>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")


def lora_argument(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` → (path, scale). A path that exists as written is taken whole."""
    match = _LORA_SCALE.match(text)
    if match is None or os.path.exists(text):
        return text, 1.0
    return match.group("path"), float(match.group("scale"))


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def save_atomically(image, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written PNG is ever visible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def generate(args: argparse.Namespace) -> int:
    from .pipeline import Krea2Pipeline

    pipe = Krea2Pipeline.from_pretrained(args.model, variant=args.variant, device=args.device,
                                         dtype=DTYPES[args.dtype or ("fp32" if args.model == "demo" else "bf16")],
                                         text_encoder=args.text_encoder, vae=args.vae, quant=args.quant,
                                         offload=args.offload, vram_gb=args.vram_gb, host_ram_gb=args.ram_gb,
                                         progress=not args.quiet)
    for path, scale in args.lora:
        pipe.load_lora(path, scale=scale, name=path)  # the path: unique even when file names repeat
    result = pipe(args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                  steps=args.steps, guidance=args.cfg, mu=args.mu, seed=args.seed,
                  num_images=args.num_images, progress=not args.quiet)
    for image, path in zip(result.images, output_paths(args.output, len(result.images))):
        save_atomically(image, path)
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_cli(lambda: generate(args))  # one `error: …` line, exit 2 (cli_errors.py)


if __name__ == "__main__":
    sys.exit(main())
