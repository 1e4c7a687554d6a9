"""`python -m krea2_lite generate PROMPT --model …`: write PNGs and print their paths.

Settings come in layers, each overriding the one before: the image given to --from-png (its
krea2_lite metadata), then the flags given on the command line, then a --prompts file's per-line
overrides. The model is loaded once for the whole list.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import string
import sys
from pathlib import Path

import torch

from .cli_errors import run_cli
from .errors import MetadataError, PromptFileError
from .quantize.recipe import DTYPES as QUANT_DTYPES, LOWRANK_NAME, SHORTCUTS as QUANT_SHORTCUTS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTS = (*QUANT_DTYPES, *QUANT_SHORTCUTS)  # every string QuantSpec.parse accepts, from the library itself
CALL_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "mu", "width", "height", "num_images")
PLACEHOLDERS = ("index", "seed", "stem")
FOLDER_PATTERN = "{stem}_{index:04d}.png"  # the file names when --output names a folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m krea2_lite", description="Krea 2 image generation")
    sub = parser.add_subparsers(dest="command", required=True)
    look = sub.add_parser("inspect", help="what a transformer file holds (format, types, config) and what it costs")
    look.add_argument("path", metavar="FILE_OR_FOLDER")
    gen = sub.add_parser("generate", help="generate images from a prompt, a prompt file or a PNG's settings")
    gen.add_argument("prompt", nargs="?", help="text prompt (optional with --prompts or --from-png)")
    gen.add_argument("--prompts", metavar="FILE", help="a .txt file (one prompt a line) or .jsonl file (one JSON "
                     "object a line: prompt plus any of negative_prompt, seed, steps, cfg, mu, width, height, size, "
                     "num_images); the model is loaded once for the whole list")
    gen.add_argument("--from-png", metavar="FILE", help="regenerate from the settings stored in a PNG written by "
                     "krea2_lite; flags given override them")
    gen.add_argument("--model", help="diffusers pipeline folder, hub id (e.g. krea/Krea-2-Turbo), transformer "
                     ".safetensors, or demo (the trained miniature shipped with krea2_lite: 64×64 shapes, seconds "
                     "on a CPU); required unless --from-png names it")
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
    gen.add_argument("--offload", choices=["auto", "none", "model", "sequential"], default="auto",
                     help="where weights live: auto plans from --vram-gb or the free GPU memory")
    gen.add_argument("--vram-gb", type=float, help="device memory budget in GiB for the offload planner")
    gen.add_argument("--ram-gb", type=float, help="host RAM in GiB the offload planner may use (host_ram_gb; "
                     "default: what the OS reports available)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="PATH[:SCALE]",
                     help="apply a LoRA .safetensors file, optionally with a scale (default 1); repeatable "
                     "(replaces a --from-png image's LoRAs)")
    return parser


# A trailing ":number" is the scale; any other ':' belongs to the path (C:\..., odd file names).
_LORA_SCALE = re.compile(r"^(?P<path>.+):(?P<scale>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")


def lora_argument(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` → (path, scale). A path that exists as written is taken whole."""
    match = _LORA_SCALE.match(text)
    if match is None or os.path.exists(text):
        return text, 1.0
    return match.group("path"), float(match.group("scale"))


# ---- settings: --from-png, then flags, then prompt-file lines ----------------------------------
def png_settings(path: str) -> tuple[dict, dict]:
    """(call settings, load settings) stored in a krea2_lite PNG; MetadataError names the file."""
    from .metadata import read_png_metadata
    from .prompts import check_value

    meta = read_png_metadata(path)
    call = {"prompt": meta["prompt"]}
    for key in ("negative_prompt", "seed", "steps", "guidance", "mu", "width", "height"):
        if meta.get(key) is not None:
            try:
                call.update(check_value(key, meta[key], f"{path} (krea2_lite metadata)"))
            except PromptFileError as exc:
                raise MetadataError(str(exc)) from None
    if "seed" not in call:
        raise MetadataError(f"{path}: the image was made from caller-given noise (no seed recorded); pass --seed")
    load = {k: meta[k] for k in ("model", "variant", "quant", "dtype", "transformer") if meta.get(k) is not None}
    if load.get("dtype") not in (None, *DTYPES) or load.get("variant") not in (None, "raw", "turbo"):
        raise MetadataError(f"{path}: unknown dtype / variant in the krea2_lite metadata: {load}")
    loras = meta.get("loras") or []
    if not isinstance(loras, list) or not all(isinstance(lo, dict) and isinstance(lo.get("name"), str)
                                              and isinstance(lo.get("scale"), (int, float)) for lo in loras):
        raise MetadataError(f"{path}: 'loras' in the krea2_lite metadata must be a list of {{name, scale}}")
    load["lora"] = [(lo["name"], float(lo["scale"])) for lo in loras]
    if "quant" in load:
        load["quant"] = _png_quant(load["quant"], path)
    return call, load


def quant_argument(text: str) -> str:
    """--quant: 'none' or any quant string the library parses (checked here, so a typo exits 2 at once)."""
    from .quantize import QuantSpec

    if text != "none":
        try:
            QuantSpec.parse(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a quant type ({exc})") from None
    return text


def _png_quant(value, path: str):
    """A stored quant: one of the library's strings, or a QuantSpec dict (a custom recipe; int4 always).
    A bare int4 string was written before PNGs recorded int4's rounding, when it was min-max: it comes
    back as min-max, so the image regenerates exactly."""
    from .quantize import QuantSpec

    try:
        if isinstance(value, str) and (value in QUANTS or LOWRANK_NAME.fullmatch(value)):
            spec = QuantSpec.parse(value)
            return dataclasses.replace(spec, rounding="minmax") if spec.dtype == "int4" else value
        if isinstance(value, dict):
            return QuantSpec.from_dict(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise MetadataError(f"{path}: the quant recipe in the krea2_lite metadata is not valid ({exc})") from None
    raise MetadataError(f"{path}: unknown quant {value!r} in the krea2_lite metadata; expected one of {QUANTS}")


def resolve_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """(call settings, load settings): the --from-png image's, overridden by the flags given."""
    call, load = png_settings(args.from_png) if args.from_png else ({}, {})
    given = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                 guidance=args.cfg, mu=args.mu, width=args.width, height=args.height, num_images=args.num_images)
    call.update({k: v for k, v in given.items() if v is not None})
    call.setdefault("seed", 0)
    call.setdefault("num_images", 1)
    flags = dict(model=args.model, variant=args.variant, dtype=args.dtype, quant=args.quant,
                 lora=args.lora or None, transformer=args.transformer)
    load.update({k: v for k, v in flags.items() if v is not None})
    if load.get("quant") == "none":
        load["quant"] = None
    if not load.get("model"):
        raise ValueError("--model is required (or --from-png with an image that names its model)")
    load.setdefault("dtype", "fp32" if load["model"] == "demo" else "bf16")
    load.setdefault("lora", [])
    return call, load


def build_jobs(args: argparse.Namespace, call: dict) -> list[dict]:
    """One dict of pipeline-call settings per prompt: the prompt file's lines over `call`, or `call`."""
    if args.prompts and args.prompt is not None:
        raise ValueError("give a prompt or --prompts FILE, not both")
    if not args.prompts:
        if not call.get("prompt"):
            raise ValueError("a prompt is needed (or --prompts FILE, or --from-png FILE)")
        return [dict(call)]
    from .prompts import read_prompt_file

    return [{**call, **line} for line in read_prompt_file(args.prompts)]  # each keeps its "line" number


def check_jobs(args: argparse.Namespace, jobs: list[dict]) -> None:
    """The pipeline's bounds that do not depend on the model (steps, CFG, mu, seed, image count, size),
    checked for every job before the model loads: a typo costs a second, not a 12.9B load. A prompt-file
    line is named in the error."""
    from . import arguments
    from .pipeline import MAX_SIDE

    for job in jobs:
        try:
            if job.get("steps") is not None:
                arguments.check_steps(job["steps"])
            if job.get("guidance") is not None:
                arguments.check_number("guidance", job["guidance"], 0.0, arguments.MAX_GUIDANCE)
            arguments.check_mu(job.get("mu"))
            images = arguments.check_int("num_images", job["num_images"], 1, arguments.MAX_IMAGES)
            arguments.check_seed(job["seed"], images)
            for side in ("width", "height"):
                if job.get(side) is not None:
                    arguments.check_int(side, job[side], 1, MAX_SIDE)
        except (ValueError, TypeError) as exc:
            if "line" not in job:
                raise
            raise PromptFileError(f"{args.prompts}:{job['line']}: {exc}") from exc


# ---- output files ------------------------------------------------------------------------------
def output_paths(output: str, count: int) -> list[Path]:
    """Plain --output: the path itself for one image, else _0, _1, … before the suffix."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def _template(output: str) -> str | None:
    """The --output pattern to format, or None for a plain path; a folder becomes FOLDER_PATTERN in it."""
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        return str(Path(output) / FOLDER_PATTERN)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(output) if f is not None]
    except ValueError as exc:
        raise ValueError(f"--output {output!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    unknown = [f for f in fields if f not in PLACEHOLDERS]
    if unknown:
        raise ValueError(f"--output {output!r}: unknown placeholder {{{unknown[0]}}}; use "
                         + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
    return output if fields else None


def plan_outputs(args: argparse.Namespace, jobs: list[dict]) -> list[list[Path]]:
    """The PNG path of every image of every job, checked before anything is loaded: no two images
    share a path, and none replaces the --from-png or --prompts file."""
    output = args.output or "sample.png"
    seeds = [[job["seed"] + i for i in range(job["num_images"])] for job in jobs]
    total = sum(len(s) for s in seeds)
    source = args.prompts or args.from_png
    stem = Path(source).stem if source else "sample"
    template = _template(output)
    if template is None:
        flat = output_paths(output, total)
    else:
        try:
            flat = [Path(template.format(index=i, seed=seed, stem=stem))
                    for i, seed in enumerate(s for job_seeds in seeds for s in job_seeds)]
        except (ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"--output {output!r}: {exc}") from None
        flat = [p if p.suffix.lower() == ".png" else p.with_name(p.name + ".png") for p in flat]
    seen = {}
    inputs = {Path(f).resolve() for f in (args.from_png, args.prompts) if f}
    for path in flat:
        key = path.resolve()
        if key in seen:
            raise ValueError(f"--output {output!r} names {path} for more than one image; add {{index}}")
        if key in inputs:
            raise ValueError(f"--output {output!r} would overwrite the input file {path}")
        seen[key] = path
    it = iter(flat)
    return [[next(it) for _ in job_seeds] for job_seeds in seeds]


# ---- running -----------------------------------------------------------------------------------
def load_pipeline(args: argparse.Namespace, load: dict):
    from .pipeline import Krea2Pipeline

    pipe = Krea2Pipeline.from_pretrained(load["model"], variant=load.get("variant"), device=args.device,
                                         dtype=DTYPES[load["dtype"]], text_encoder=args.text_encoder, vae=args.vae,
                                         quant=load.get("quant"), offload=args.offload, vram_gb=args.vram_gb,
                                         host_ram_gb=args.ram_gb, progress=not args.quiet,
                                         transformer=load.get("transformer"))
    for path, scale in load["lora"]:
        pipe.load_lora(path, scale=scale, name=path)  # the path: unique even when file names repeat
    return pipe


def run_jobs(pipe, jobs: list[dict], paths: list[list[Path]], args: argparse.Namespace) -> None:
    """One pipeline call per job; one progress bar over every image when there are several jobs."""
    from tqdm.auto import tqdm

    from .metadata import save_png

    several = len(jobs) > 1
    with tqdm(total=sum(len(p) for p in paths), desc="images", unit="image",
              disable=args.quiet or not several) as bar:
        for job, job_paths in zip(jobs, paths):
            try:
                result = pipe(job["prompt"], negative_prompt=job.get("negative_prompt"), width=job.get("width"),
                              height=job.get("height"), steps=job.get("steps"), guidance=job.get("guidance"),
                              mu=job.get("mu"), seed=job["seed"], num_images=job["num_images"],
                              progress=not args.quiet and not several)
            except (ValueError, TypeError) as exc:  # a setting the pipeline refused: say which line set it
                if "line" not in job:
                    raise
                raise PromptFileError(f"{args.prompts}:{job['line']}: {exc}") from exc
            for image, meta, path in zip(result.images, result.metadata, job_paths):
                save_png(image, path, None if args.no_metadata else meta)
                print(path, flush=True)
            bar.update(len(job_paths))


def generate(args: argparse.Namespace) -> int:
    call, load = resolve_settings(args)
    jobs = build_jobs(args, call)
    check_jobs(args, jobs)  # every input checked before the (slow) model load
    paths = plan_outputs(args, jobs)
    pipe = load_pipeline(args, load)
    run_jobs(pipe, jobs, paths, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.command == "inspect":
        from .inspect_file import inspect

        return run_cli(lambda: inspect(args.path))
    return run_cli(lambda: generate(args))  # one `error: …` line, exit 2 (cli_errors.py)


if __name__ == "__main__":
    sys.exit(main())
