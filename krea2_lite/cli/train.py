"""`python -m krea2_lite.train --model M --data DIR --output lora.safetensors --rank R --steps N --lr LR ...`

Trains a LoRA on the frozen (optionally quantized) transformer (docs/training.md). Errors follow
the command lines' contract (`error_contract.py`): one `error: …` line, exit 2; Ctrl-C saves the
last completed step and exits 130. `krea2_lite/train/__main__.py` calls `main` here.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

from ..train import TrainingInterrupted, train_lora
from ..train.settings import TARGET_GROUPS
from .error_contract import EXIT_INTERRUPTED, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m krea2_lite.train",
                                description="Train a LoRA for Krea 2 on a folder of captioned images")
    p.add_argument("--model", help="pipeline folder or hub id (transformer, text encoder, VAE)")
    p.add_argument("--transformer", help="a transformer file/folder replacing the model's")
    p.add_argument("--text-encoder", help="a text encoder folder replacing the model's")
    p.add_argument("--vae", help="a full Qwen-Image vae/ folder (with its encoder) replacing the model's")
    p.add_argument("--data", required=True, help="folder of NAME.png|jpg|webp + NAME.txt, or metadata.jsonl")
    p.add_argument("--output", required=True, help="the LoRA .safetensors to write (diffusers/PEFT layout)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, factor 1)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--resolution", type=int, default=1024, help="bucket area ≈ resolution², sides multiples of 16")
    p.add_argument("--quant", default=None, help="int8 | fp8 | int4 | int8-w8a8 | ... (the base stays frozen)")
    p.add_argument("--targets", default="attn,mlp", help=f"comma list of {', '.join(TARGET_GROUPS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="a checkpoint folder (OUTPUT.checkpoint) to continue")
    p.add_argument("--trigger", default=None, help="a word put before every caption")
    p.add_argument("--no-crop", action="store_true", help="stretch to the bucket instead of centre-cropping")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--cache-dir", default=None, help="where latents and text states are cached")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vram-gb", type=float, default=None)
    p.add_argument("--ram-gb", type=float, default=None)
    p.add_argument("--sample-every", type=int, default=None, metavar="N",
                   help="every N steps and at the end, one image per --sample-prompts line (OUTPUT_STEM-samples/)")
    p.add_argument("--sample-prompts", default=None, metavar="FILE", help="prompts to sample: .txt one a line, or .jsonl")
    p.add_argument("--quiet", action="store_true")
    return p


def _train(args) -> int:
    try:
        train_lora(args.model, data=args.data, output=args.output, rank=args.rank, alpha=args.alpha,
                   steps=args.steps, lr=args.lr, batch=args.batch, grad_accum=args.grad_accum,
                   resolution=args.resolution, quant=args.quant, targets=args.targets, seed=args.seed,
                   save_every=args.save_every, resume=args.resume, trigger=args.trigger,
                   center_crop=not args.no_crop, flip=args.flip, transformer=args.transformer,
                   text_encoder=args.text_encoder, vae=args.vae, cache_dir=args.cache_dir, device=args.device,
                   vram_gb=args.vram_gb, ram_gb=args.ram_gb, progress=not args.quiet,
                   sample_every=args.sample_every, sample_prompts=args.sample_prompts,
                   log=(lambda *a: None) if args.quiet else print)
    except TrainingInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C: the last completed step is saved and the run exits 130."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def on_term(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: no handler
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _sigterm_as_interrupt():
        return run_cli(lambda: _train(args))
