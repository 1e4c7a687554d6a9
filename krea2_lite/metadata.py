"""Generation settings carried inside PNGs, so an image can be reproduced or varied later.

Two text chunks, both written by `save_png`:
  `parameters`  A1111 style, read by image viewers, civitai and ComfyUI: the prompt, then
                `Negative prompt: …`, then one line `Steps: 8, CFG scale: 0, Seed: 3, Size: 1024x1024, …`.
  `krea2_lite`  the same settings as JSON (FIELDS below), the form `read_png_metadata` and
                `python -m krea2_lite generate --from-png` read back.

`mu` is null when the timestep shift was derived from the image size (a changed size then derives
its own), and the pinned value otherwise. `seed` is the seed of THIS image (a call's image i uses
seed + i), null when the caller passed its own latents.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import torch

from .errors import JsonFileError, MetadataError
from .files.jsonfile import parse_json
from .files.leftovers import partial_name
from .files.paths import local_identity
from .files.png_text import MAX_TEXT_BYTES, read_png_text

METADATA_KEY = "krea2_lite"
PARAMETERS_KEY = "parameters"
FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "mu", "width", "height", "max_sequence_length",
          "model", "model_bytes", "revision", "variant", "quant", "loras", "dtype", "version")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def quant_label(spec) -> str | dict | None:
    """A QuantSpec as the library's own string for it (int8, int8-w8a8-rot, …) when one names it
    exactly, else its full dict (custom include/exclude, group size): either form parses back.
    int4 is always the dict, which records its `rounding`: the bare string "int4" in an older PNG
    means min-max rounding, the default before the clip search (see `png_quant`)."""
    if spec is None:
        return None
    if spec.dtype == "int4":
        return spec.to_dict()
    from .quantize import QuantSpec
    from .quantize.recipe import DTYPES, SHORTCUTS

    for name in (*DTYPES, *SHORTCUTS):
        if QuantSpec.parse(name) == spec:
            return name
    return spec.to_dict()


def pipeline_metadata(pipe) -> dict:
    """The settings a pipeline adds to every image: model, variant, quant, LoRAs, dtype, version."""
    from .version import __version__
    from .lora import loaded_loras

    quantization = getattr(pipe.transformer, "quantization", None)
    model = getattr(pipe, "source", None)
    identity = local_identity(model) if model not in (None, "demo") else None  # absolute path + size
    loras = []
    for name, scale in loaded_loras(pipe.transformer).items():
        entry = dict(name=name, scale=scale)
        found = getattr(pipe, "lora_files", {}).get(name)
        if found is not None and local_identity(found) is not None:
            entry.update(path=local_identity(found)[0], bytes=local_identity(found)[1])
        loras.append(entry)
    shared = dict(model=identity[0] if identity else model, model_bytes=identity[1] if identity else None,
                  revision=getattr(pipe, "revision", None), variant=pipe.variant,
                  quant=quant_label(quantization.spec if quantization is not None else None), loras=loras,
                  dtype=DTYPE_NAMES.get(pipe.dtype, str(pipe.dtype).replace("torch.", "")), version=__version__)
    source = getattr(pipe, "transformer_source", None)
    if source:  # `--transformer FILE` replaced the model's own: found again by absolute path and size
        found = local_identity(source)
        shared["transformer"] = found[0] if found else source
        if found:
            shared["transformer_bytes"] = found[1]
    return shared


def image_metadata(pipe, *, prompts: list[str], negatives: list[str] | None, num_images: int, seed: int | None,
                   steps: int, guidance: float, mu: float | None, width: int, height: int,
                   max_sequence_length: int | None = None) -> list[dict]:
    """One dict per image of a call (prompt-major, as Krea2Output.images), keys in FIELDS order."""
    shared = pipeline_metadata(pipe)
    out = []
    for i in range(len(prompts) * num_images):
        p = i // num_images
        out.append(dict(prompt=prompts[p], negative_prompt=negatives[p] if negatives else None,
                        seed=None if seed is None else seed + i, steps=steps, guidance=guidance, mu=mu,
                        width=width, height=height, max_sequence_length=max_sequence_length, **shared))
    return out


def _quote(value) -> str:
    """A1111's rule: a value holding ',', ':' or a newline is written as a JSON string."""
    if isinstance(value, float):  # 0.0 → 0, 3.5 → 3.5, and full precision otherwise
        value = int(value) if value.is_integer() else value
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _one_line(text) -> str:
    """A prompt on one line: A1111 readers take a line starting `Negative prompt:` as the negative and
    the last line as the settings, so a prompt's own line breaks could forge both. The exact prompt
    stays in the krea2_lite chunk."""
    return " ".join(str(text).splitlines())


def format_parameters(meta: dict) -> str:
    """The A1111 `parameters` text of one image's metadata (prompts flattened to one line each)."""
    lines = [_one_line(meta.get("prompt", ""))]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {_one_line(meta['negative_prompt'])}")
    items = [("Steps", meta.get("steps")), ("CFG scale", meta.get("guidance")), ("Seed", meta.get("seed")),
             ("Size", f"{meta.get('width')}x{meta.get('height')}"), ("Model", meta.get("model")),
             ("Revision", meta.get("revision")), ("Variant", meta.get("variant"))]
    quant = meta.get("quant")
    if quant is not None:
        items.append(("Quant", quant if isinstance(quant, str) else _quant_dict_name(quant)))
    items += [("Mu", meta.get("mu")), ("Dtype", meta.get("dtype")), ("Denoising strength", meta.get("strength"))]
    loras = meta.get("loras") or []
    if loras:
        items.append(("LoRA", ", ".join(f"{lo['name']}:{lo['scale']:g}" for lo in loras)))
    items.append(("krea2_lite", meta.get("version")))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in items if value is not None))
    return "\n".join(lines)


def _quant_dict_name(data: dict) -> str:
    from .quantize import QuantSpec

    return QuantSpec.from_dict(data).name


def save_png(image, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `image` (PIL) as a PNG at `path`, with `metadata` (one image's dict) in its text chunks.

    Atomic: written under a temporary name beside `path`, then renamed, so no half-written PNG is
    ever visible. The file is created with mode 0o666 like any `open(path, "w")`, so the umask
    decides its permissions (a mkstemp file would stay 0600).
    """
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = None
    if metadata is not None:
        check_metadata_types(metadata, f"{path} (metadata to write)")  # only what read_png_metadata reads back
        info = PngInfo()
        chunks = {PARAMETERS_KEY: format_parameters(metadata), METADATA_KEY: json.dumps(metadata, ensure_ascii=False)}
        for key, text in chunks.items():  # never write what read_png_metadata (or PIL) would refuse
            if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
                raise MetadataError(f"{path}: the {key!r} text chunk would be {len(text.encode('utf-8'))} bytes, "
                                    f"above the {MAX_TEXT_BYTES} readers accept; nothing written (shorten the prompt "
                                    "or pass metadata=None / --no-metadata)")
            info.add_itxt(key, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _create_beside(path: Path) -> tuple[int, str]:
    """A new, empty temporary file in path's folder: (fd, name). O_EXCL: never another's file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.with_name(partial_name(path.name, middle="." + secrets.token_hex(4))))
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file for {path.name}")


# The type of each stored field (None: may be null). Checked where a PNG enters, so a hand-made or
# hostile PNG is a MetadataError naming it, never a TypeError from deep inside.
_FIELD_TYPES = {"prompt": (str,), "negative_prompt": (str, type(None)), "seed": (int, type(None)),
                "steps": (int,), "guidance": (int, float), "mu": (int, float, type(None)), "width": (int,),
                "height": (int,), "model": (str, type(None)), "variant": (str, type(None)),
                "quant": (str, dict, type(None)), "loras": (list, type(None)), "dtype": (str, type(None)),
                "version": (str, type(None)), "max_sequence_length": (int, type(None)),
                "model_bytes": (int, type(None))}


def check_metadata_types(meta: dict, where: str) -> dict:
    """Every known field of `meta` of its stored type (bools are not numbers); MetadataError names `where`."""
    for key, kinds in _FIELD_TYPES.items():
        if key not in meta and type(None) in kinds:
            continue
        value = meta.get(key)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise MetadataError(f"{where}: '{key}' in the krea2_lite metadata must be {names}, "
                                f"found {json.dumps(value)[:60] if key in meta else 'nothing'}")
    return meta


def read_png_metadata(path: str | os.PathLike) -> dict:
    """The `krea2_lite` settings of a PNG written by `save_png`. MetadataError names the file when it
    is not a readable PNG (files/png_text.py: chunk limits, no pixels decoded), carries no krea2_lite
    chunk, or the chunk is not a JSON object (depth / digit limits) whose fields have their types."""
    path = Path(path)
    text = read_png_text(path)
    raw = text.get(METADATA_KEY)
    if raw is None:
        other = " (it has an A1111 'parameters' chunk, but not krea2_lite's)" if PARAMETERS_KEY in text else ""
        raise MetadataError(f"{path}: no krea2_lite metadata{other}; only PNGs written by krea2_lite without "
                            "--no-metadata carry it")
    try:
        meta = parse_json(raw, where=str(path), what="the krea2_lite metadata")
    except JsonFileError as exc:
        raise MetadataError(str(exc)) from None
    return check_metadata_types(meta, str(path))
