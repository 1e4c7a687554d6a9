"""Preprocess once: VAE latents and text-encoder states of every item, cached on disk.

Each latent file is keyed by the image file's sha256 and every setting that changes it (bucket,
crop, flips, the VAE's folder and its weights' size); each text file by the caption and the text
encoder's settings. A later run with the same keys reads the files and loads neither encoder.
Encoders are loaded only when something is missing, and released (references dropped, CUDA cache
emptied) before this returns, so the first training step holds neither.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files.leftovers import partial_name
from ..files.small_tensor_file import read_small_file

from .data import Item, load_pixels


@dataclass(frozen=True)
class Example:
    latent_file: Path
    text_file: Path
    bucket: tuple[int, int]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _identity(folder: Path) -> list:
    """A component folder named by path and its weight files' sizes (a replaced file is a new key)."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.safetensors")) if folder.is_dir() else [folder]
    return [str(folder.resolve())] + [(f.name, f.stat().st_size) for f in files]


def save_atomic(tensors: dict, path, metadata: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(partial_name(path.name))  # a killed run's: removed by the next (run_paths)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; a LoRA is meant to be shared
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _encode_latents(vae, item: Item, flip: bool, center_crop: bool) -> dict:
    pixels = torch.from_numpy(load_pixels(item, center_crop).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    batch = torch.cat([pixels, pixels.flip(-1)]) if flip else pixels
    latents = vae.normalize_latents(vae.encode(batch, tile="auto").float())  # tiles only above the auto area
    out = {"latent": latents[0]}
    if flip:
        out["latent_flip"] = latents[1]
    return out


def _encode_text(encoder, caption: str, max_sequence_length: int, padded: bool = False) -> dict:
    # A caption is encoded at its own length, not padded to max_sequence_length: the text model is causal
    # and right-padded, so its real tokens' states are nearly the same (and 512-token padding costs ~10×).
    # A sample prompt (`padded`) is encoded as the pipeline encodes it, so that a sample is the image
    # generation gives (on the demo the two encodings differ by up to 0.09 in a state, 9/255 in a pixel).
    tokens = len(encoder.tokenizer(encoder.prompt_template_prefix + caption).input_ids)
    length = max(1, min(max_sequence_length, tokens - encoder.prefix_tokens + encoder.suffix_tokens))
    length = max_sequence_length if padded else length
    hidden, mask = encoder.encode([caption], length)
    return {"hidden": hidden[0][mask[0].bool()].float()}


def text_file(caption: str, spec, settings, text_id: list | None = None, padded: bool = False) -> Path:
    """Where the text states of `caption` are cached (a training caption, or a sample prompt: `padded`)."""
    text_id = _identity(spec.text_encoder) if text_id is None else text_id
    parts = (caption, settings.max_sequence_length, spec.select_layers, text_id) + (("padded",) if padded else ())
    key = _key(*parts)
    return settings.cache_path / "text" / f"{key}.safetensors"


def preprocess(items: list[Item], spec, settings, *, log=print, extra_texts=()) -> list[Example]:
    """Cached latents and text states for every item (and the text states of `extra_texts`, the sample
    prompts, read back with `text_file`); missing ones computed with the encoders."""
    root = settings.cache_path
    vae_id, text_id = _identity(spec.vae), _identity(spec.text_encoder)
    examples, todo_latent, todo_text = [], [], []
    for item in items:
        latent = root / "latents" / f"{_key(item.digest, item.bucket, settings.center_crop, settings.flip, vae_id)}.safetensors"
        text = text_file(item.caption, spec, settings, text_id)
        examples.append(Example(latent, text, item.bucket))
        if not latent.is_file():
            todo_latent.append((item, latent))
        if not text.is_file():
            todo_text.append(((item.caption, False), text))
    for caption in dict.fromkeys(extra_texts):
        if not text_file(caption, spec, settings, text_id, padded=True).is_file():
            todo_text.append(((caption, True), text_file(caption, spec, settings, text_id, padded=True)))
    if todo_latent:
        from ..loading.vae_encoder import load_vae_encoder

        log(f"encoding {len(todo_latent)} image(s) with the VAE encoder (cached in {root})")
        vae = load_vae_encoder(spec.vae, device=settings.device)
        for item, path in todo_latent:
            save_atomic({k: v.cpu() for k, v in _encode_latents(vae, item, settings.flip, settings.center_crop).items()},
                        path)
        del vae
    if todo_text:
        from ..loading.text_encoder import load_text_encoder

        log(f"encoding {len(todo_text)} caption(s) with the text encoder (cached in {root})")
        # bf16 on a GPU (a 4B text encoder in float32 would not fit a 12 GB card); float32 on the CPU.
        dtype = torch.bfloat16 if torch.device(settings.device).type == "cuda" else torch.float32
        encoder = load_text_encoder(spec.text_encoder, device=settings.device, dtype=dtype,
                                    select_layers=spec.select_layers)
        for (caption, padded), path in dict(todo_text).items():
            states = _encode_text(encoder, caption, settings.max_sequence_length, padded)
            save_atomic({k: v.cpu() for k, v in states.items()}, path)
        del encoder
    gc.collect()  # both encoders leave memory before the first step
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return examples


def read_example(example: Example, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent (C, h, w), text (n, layers, dim)) from the cache, float32."""
    latents = read_small_file(example.latent_file)
    latent = latents["latent_flip"] if flipped and "latent_flip" in latents else latents["latent"]
    return latent.float(), read_small_file(example.text_file)["hidden"].float()


__all__ = ["Example", "preprocess", "read_example", "save_atomic", "text_file"]
