"""`python -m krea2_lite generate PROMPT --model …`: write PNGs and print their paths.

Parse, check every job and output path (`generate_settings`, `generate_outputs`), load the model once
for the whole list, then one pipeline call per job. The settings come from --from-png, the flags and
a --prompts file, in that order of precedence (lowest first).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checks import OFFLOAD_MODES
from ..kernels.dispatch import kernel_backend
from ..metadata import save_png
from .generate_ray import add_ray_arguments, run_ray
from . import generate_images
from .generate_outputs import plan_outputs
from .generate_settings import (DTYPES, QUANTS, build_jobs, check_jobs, errors_name_the_line, lora_argument,
                                quant_argument, resolve_settings, cache_argument)

NAME = "generate"
HELP = "generate images from a prompt, a prompt file or a PNG's settings"


def add_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt", nargs="?", help="text prompt (optional with --prompts or --from-png)")
    gen.add_argument("--prompts", metavar="FILE", help="a .txt file (one prompt a line) or .jsonl file (one JSON "
                     "object a line: prompt plus any of negative_prompt, seed, steps, cfg, mu, width, height, size, "
                     "num_images); the model is loaded once for the whole list")
    gen.add_argument("--prompts-format", choices=["auto", "txt", "jsonl"], default="auto",
                     help="how to read --prompts (auto: .jsonl/.ndjson are JSON lines, .txt text, else by content)")
    gen.add_argument("--from-png", metavar="FILE", help="regenerate from the settings stored in a PNG written by "
                     "krea2_lite; flags given override them")
    gen.add_argument("--allow-download", action="store_true", help="let --from-png fetch a model or LoRA the PNG "
                     "names from the Hugging Face hub (default: only local or already cached files)")
    gen.add_argument("--model", help="diffusers pipeline folder, hub id (e.g. krea/Krea-2-Turbo), transformer "
                     ".safetensors, or demo (the trained miniature shipped with krea2_lite: 64×64 shapes, seconds "
                     "on a CPU); required unless --from-png names it")
    gen.add_argument("--revision", help="hub branch, tag or commit of --model (default: a --from-png image's "
                     "recorded commit, else main)")
    gen.add_argument("--transformer", metavar="FILE", help="a transformer file replacing --model's (GGUF, ComfyUI "
                     "fp8 / int8, any safetensors layout, a quantized folder)")
    gen.add_argument("--text-encoder", help="Qwen3-VL folder or hub id (when --model is a single file)")
    gen.add_argument("--vae", help="Qwen-Image vae/ folder (when --model is a single file)")
    gen.add_argument("--variant", choices=["raw", "turbo"], help="sampling defaults (Raw: 52 steps, CFG 3.5; "
                     "Turbo: 8 steps, CFG 0, mu 1.15); default: from the checkpoint, else raw")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--cfg", type=float, help="guidance g in cond + g·(cond − uncond); 0 disables")
    gen.add_argument("--mu", type=float, help="pin the timestep shift instead of deriving it from the size")
    gen.add_argument("--width", type=int, help="default: the model's own (1024; the demo: 64)")
    gen.add_argument("--height", type=int, help="default: the model's own (1024; the demo: 64)")
    gen.add_argument("--num-images", type=int, help="images per prompt (default 1)")
    gen.add_argument("--seed", type=int, help="image i of a prompt uses seed + i (default 0; each line of a "
                     "prompt file starts again at this seed unless it sets its own)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--output", help="PNG path (default sample.png), or a folder (ending in / or existing), or a "
                     "pattern with {index} (image number in this run), {seed}, {stem} (the --prompts / --from-png "
                     "file's name, else 'sample'); without placeholders several images get _0, _1, …")
    gen.add_argument("--no-metadata", action="store_true", help="write no settings into the PNGs (by default: "
                     "an A1111 'parameters' chunk and a 'krea2_lite' JSON chunk)")
    gen.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    gen.add_argument("--dtype", choices=sorted(DTYPES),
                     help="default bf16; fp32 for --model demo (tiny: CPUs without native bf16 run it ~3× slower)")
    gen.add_argument("--quant", type=quant_argument, metavar="{none," + ",".join(QUANTS) + ",int4-lrR}",
                     help="quantize the transformer while loading (none: full precision, also over a "
                     "--from-png image's quant; int4-lrR: int4 with a rank-R low-rank correction)")
    gen.add_argument("--offload", choices=list(OFFLOAD_MODES), default="auto",
                     help="where weights live: auto plans from --vram-gb or the free GPU memory")
    gen.add_argument("--vram-gb", type=float, help="device memory budget in GiB for the offload planner")
    gen.add_argument("--ram-gb", type=float, help="host RAM in GiB the offload planner may use (host_ram_gb; "
                     "default: what the OS reports available)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="PATH[:SCALE]",
                     help="apply a LoRA .safetensors file, optionally with a scale (default 1); repeatable "
                     "(replaces a --from-png image's LoRAs)")
    add_ray_arguments(gen)  # --ray, --workers, --gpus-per-worker: a Ray Data job (krea2_lite/batch)
    gen.add_argument("--cache", type=cache_argument, metavar="SPEC",
                     help="step cache: fbcache:T (skip the later blocks when the first block's output changed "
                     "by less than T), taylor:O (predict them instead), KEY=VALUE knobs after commas; none: off "
                     "(also over a --from-png image's cache); see docs/step-caching.md")
    generate_images.add_arguments(gen)  # --image --strength --mask --mask-blur --outpaint


def load_pipeline(args: argparse.Namespace, load: dict):
    from ..pipeline import Krea2Pipeline  # torch + transformers: only once the arguments are known good

    pipe = Krea2Pipeline.from_pretrained(load["model"], variant=load.get("variant"), device=args.device,
                                         dtype=DTYPES[load["dtype"]], text_encoder=args.text_encoder, vae=args.vae,
                                         quant=load.get("quant"), offload=args.offload, vram_gb=args.vram_gb,
                                         host_ram_gb=args.ram_gb, progress=not args.quiet,
                                         revision=load.get("revision"), transformer=load.get("transformer"))
    for path, scale in load["lora"]:
        pipe.load_lora(path, scale=scale, name=path)  # the path: unique even when file names repeat
    return pipe


def run_jobs(pipe, jobs: list[dict], paths: list[list[Path]], args: argparse.Namespace) -> None:
    """One pipeline call per job; one progress bar over every image when there are several jobs."""
    from tqdm.auto import tqdm

    several = len(jobs) > 1
    with tqdm(total=sum(len(p) for p in paths), desc="images", unit="image",
              disable=args.quiet or not several) as bar:
        for job, job_paths in zip(jobs, paths):
            extra = {"max_sequence_length": job["max_sequence_length"]} if job.get("max_sequence_length") else {}
            with errors_name_the_line(args, job):  # a setting the pipeline refused: say which line set it
                result = pipe(job["prompt"], **extra, negative_prompt=job.get("negative_prompt"), width=job.get("width"),
                              height=job.get("height"), steps=job.get("steps"), guidance=job.get("guidance"),
                              mu=job.get("mu"), seed=job["seed"], num_images=job["num_images"],
                              progress=not args.quiet and not several, cache=job.get("cache"),
                              **generate_images.call_kwargs(job))
            for image, meta, path in zip(result.images, result.metadata, job_paths):
                save_png(image, path, None if args.no_metadata else meta)
                print(path, flush=True)
            bar.update(len(job_paths))


def run(args: argparse.Namespace) -> int:
    call, load = resolve_settings(args)
    jobs = build_jobs(args, call)
    check_jobs(args, jobs)  # every input checked before the (slow) model load
    kernel_backend()  # and the environment: KREA2_LITE_KERNELS
    if args.ray is not None:
        return run_ray(args, jobs, load)
    paths = plan_outputs(args, jobs)
    pipe = load_pipeline(args, load)
    run_jobs(pipe, jobs, paths, args)
    return 0
