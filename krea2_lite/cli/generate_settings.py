"""The settings of `generate`'s jobs, in layers, each overriding the one before: the image given to
--from-png (its krea2_lite metadata), then the flags given on the command line, then a --prompts
file's per-line overrides. Every job is checked (`checks.check_call_settings`, the pipeline's own
rules) before the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re

import torch

from .. import checks
from ..cache import parse_cache
from ..errors import ArgumentError, MetadataError, PromptFileError
from ..files.paths import is_cached_hub_id, local_identity, looks_like_hub_id
from ..metadata import read_png_metadata
from ..quantize import QuantSpec
from ..quantize.recipe import DTYPES as QUANT_DTYPES, is_quant_name, SHORTCUTS as QUANT_SHORTCUTS
from . import generate_images
from .prompt_files import check_value, read_prompt_file

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTS = (*QUANT_DTYPES, *QUANT_SHORTCUTS)  # every string QuantSpec.parse accepts, from the library itself

# A trailing ":number" is the scale; any other ':' belongs to the path (C:\..., odd file names).
_LORA_SCALE = re.compile(r"^(?P<path>.+):(?P<scale>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")


# ---- flag types (argparse calls these; an error exits 2 with argparse's message) --------------
def lora_argument(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` → (path, scale). A path that exists as written is taken whole."""
    match = _LORA_SCALE.match(text)
    if match is None or os.path.exists(text):
        return text, 1.0
    return match.group("path"), float(match.group("scale"))


def quant_argument(text: str) -> str:
    """--quant: 'none' or any quant string the library parses (checked here, so a typo exits 2 at once)."""
    if text != "none":
        try:
            QuantSpec.parse(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a quant type ({exc})") from None
    return text


def cache_argument(text: str) -> str:
    """--cache: 'none' or a step cache spec, checked here (a typo exits 2 at once), kept canonical."""
    try:
        spec = parse_cache(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return "none" if spec is None else spec.name


# ---- --from-png, then flags, then prompt-file lines --------------------------------------------
def png_settings(path: str, replaced: frozenset = frozenset()) -> tuple[dict, dict]:
    """(call settings, load settings) stored in a krea2_lite PNG; MetadataError names the file."""
    meta = read_png_metadata(path)
    call = {"prompt": meta["prompt"]}
    for key in ("negative_prompt", "seed", "steps", "guidance", "mu", "width", "height"):
        if meta.get(key) is not None:
            try:
                call.update(check_value(key, meta[key], f"{path} (krea2_lite metadata)"))
            except PromptFileError as exc:
                raise MetadataError(str(exc)) from None
    if meta.get("cache") is not None:
        call["cache"] = _png_cache(meta["cache"], path)
    if "seed" not in call:
        raise MetadataError(f"{path}: the image was made from caller-given noise (no seed recorded); pass --seed")
    if meta.get("max_sequence_length") is not None:
        call["max_sequence_length"] = meta["max_sequence_length"]
    load = {k: meta[k] for k in ("model", "revision", "variant", "quant", "dtype", "transformer") if meta.get(k) is not None}
    check_same_files(path, meta, replaced)
    if (load.get("dtype") not in (None, *DTYPES) or load.get("variant") not in (None, "raw", "turbo")
            or not isinstance(load.get("revision", ""), str)):
        raise MetadataError(f"{path}: unknown dtype / variant / revision in the krea2_lite metadata: {load}")
    loras = meta.get("loras") or []
    if not isinstance(loras, list) or not all(isinstance(lo, dict) and isinstance(lo.get("name"), str)
                                              and isinstance(lo.get("scale"), (int, float)) for lo in loras):
        raise MetadataError(f"{path}: 'loras' in the krea2_lite metadata must be a list of {{name, scale}}")
    load["lora"] = [(lo["path"] if isinstance(lo.get("path"), str) else lo["name"], float(lo["scale"]))
                    for lo in loras]  # the recorded absolute path when there is one (API loads name a stem)
    if "quant" in load:
        load["quant"] = _png_quant(load["quant"], path)
    call.update(generate_images.from_png(meta, path))  # the input image / mask it was made from, if any
    return call, load


def check_same_files(path: str, meta: dict, replaced: frozenset = frozenset()) -> None:
    """The model and LoRAs a PNG names are the files that drew it: a recorded size that differs from
    what is found now is a MetadataError (one line) rather than a silently different image.
    `replaced`: what the user's flags replace ("model", "transformer", "LoRA"), not checked."""
    wanted = [(meta.get("model"), meta.get("model_bytes"), "model"),
              (meta.get("transformer"), meta.get("transformer_bytes"), "transformer")]
    wanted += [(lo.get("path"), lo.get("bytes"), "LoRA") for lo in meta.get("loras") or [] if isinstance(lo, dict)]
    for where, size, what in wanted:
        if what in replaced or not isinstance(where, str) or not isinstance(size, int) or isinstance(size, bool):
            continue
        found = local_identity(where)
        if found is None:
            raise MetadataError(f"{path}: the {what} it was made with, {where}, is not found here; pass --model / "
                                "--transformer / --lora to choose one (the image may then differ)")
        if found[1] != size:
            raise MetadataError(f"{path}: the {what} {where} holds {found[1]} bytes of weights, the image was made "
                                f"with {size}: a different file; pass --model / --transformer / --lora to use it anyway")


def check_download_allowed(path: str, load: dict, allow: bool) -> None:
    """A model or LoRA named by someone else's PNG is used only if it is local or already cached."""
    names = [("model", load.get("model"), load.get("revision")), ("transformer", load.get("transformer"), None)]
    names += [("LoRA", lo[0], None) for lo in load.get("lora", [])]
    for what, name, revision in names:
        if (allow or not isinstance(name, str) or name == "demo" or os.path.exists(os.path.expanduser(name))
                or not looks_like_hub_id(name) or is_cached_hub_id(name, revision)):
            continue
        raise MetadataError(f"{path}: names the {what} {name!r}, which is neither local nor in the Hugging Face "
                            "cache; pass --allow-download to fetch it, or --model / --lora to choose")


def _png_quant(value, path: str):
    """A stored quant: one of the library's strings, or a QuantSpec dict (a custom recipe; int4 always).
    A bare int4 string was written before PNGs recorded int4's rounding, when it was min-max: it comes
    back as min-max, so the image regenerates exactly."""
    try:
        if is_quant_name(value):
            spec = QuantSpec.parse(value)
            return dataclasses.replace(spec, rounding="minmax") if spec.dtype == "int4" else value
        if isinstance(value, dict):
            return QuantSpec.from_dict(value)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MetadataError(f"{path}: the quant recipe in the krea2_lite metadata is not valid ({exc})") from None
    raise MetadataError(f"{path}: unknown quant {value!r} in the krea2_lite metadata; expected one of {QUANTS}")


def _png_cache(value, path: str) -> str:
    try:
        return parse_cache(value).name
    except (AttributeError, TypeError, ValueError) as exc:
        raise MetadataError(f"{path}: the cache spec in the krea2_lite metadata is not valid ({exc})") from None


def resolve_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """(call settings, load settings): the --from-png image's, overridden by the flags given."""
    replaced = frozenset(what for what, flag in (("model", args.model), ("transformer", args.transformer),
                                                 ("LoRA", args.lora)) if flag)
    call, load = png_settings(args.from_png, replaced) if args.from_png else ({}, {})
    if args.from_png:  # only what the PNG named (flags given below are the user's own choice)
        check_download_allowed(args.from_png, load, getattr(args, "allow_download", False))
    given = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                 guidance=args.cfg, mu=args.mu, width=args.width, height=args.height, num_images=args.num_images,
                 cache=args.cache)
    call.update({k: v for k, v in given.items() if v is not None})
    generate_images.resolve(call, generate_images.given(args))  # --image etc.; --from-png inputs hash-checked
    call.setdefault("seed", 0)
    call.setdefault("num_images", 1)
    flags = dict(model=args.model, variant=args.variant, dtype=args.dtype, quant=args.quant,
                 lora=args.lora or None, revision=args.revision, transformer=args.transformer)
    if args.model is not None and args.revision is None:
        load.pop("revision", None)  # the image's commit belongs to the image's model
    load.update({k: v for k, v in flags.items() if v is not None})
    if load.get("quant") == "none":
        load["quant"] = None
    if not load.get("model"):
        raise ArgumentError("--model is required (or --from-png with an image that names its model)")
    load.setdefault("dtype", "fp32" if load["model"] == "demo" else "bf16")
    load.setdefault("lora", [])
    return call, load


def build_jobs(args: argparse.Namespace, call: dict) -> list[dict]:
    """One dict of pipeline-call settings per prompt: the prompt file's lines over `call`, or `call`."""
    if args.prompts and args.prompt is not None:
        raise ArgumentError("give a prompt or --prompts FILE, not both")
    if not args.prompts:
        if not call.get("prompt"):
            raise ArgumentError("a prompt is needed (or --prompts FILE, or --from-png FILE)")
        return [dict(call)]
    return [{**call, **line} for line in read_prompt_file(args.prompts, getattr(args, "prompts_format", "auto"))]  # each keeps its "line" number


def check_jobs(args: argparse.Namespace, jobs: list[dict]) -> None:
    """The pipeline's bounds that do not depend on the model (steps, CFG, mu, seed, image count, size),
    checked for every job before the model loads: a typo costs a second, not a 12.9B load. A prompt-file
    line is named in the error."""
    for job in jobs:
        with errors_name_the_line(args, job):
            checks.check_call_settings(steps=job.get("steps"), guidance=job.get("guidance"), mu=job.get("mu"),
                                       num_images=job["num_images"], seed=job["seed"], width=job.get("width"),
                                       height=job.get("height"))
            generate_images.check_job(job)  # input image / mask read and checked


@contextlib.contextmanager
def errors_name_the_line(args: argparse.Namespace, job: dict):
    """An ArgumentError about a prompt-file job becomes a PromptFileError naming the file and the line."""
    try:
        yield
    except ArgumentError as exc:
        if "line" not in job:
            raise
        raise PromptFileError(f"{args.prompts}:{job['line']}: {exc}") from exc
