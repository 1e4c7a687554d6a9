"""The shipped demo model laid out like the official hub repos (krea/Krea-2-Turbo, krea/Krea-2-Raw):
the diffusers components (transformer/ and text_encoder/ sharded with an index; the text encoder's
vision tower alone in its own shard), a root single-file transformer in official key names
(`turbo.safetensors`), images/, a license PDF, and a pickle decoy that must never be fetched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from krea2_lite.files.checkpoint import diffusers_to_official_key
from krea2_lite.demo import demo_path

REPO = "krea/Krea-2-Turbo"
VISION_SHARD = "text_encoder/model-00002-of-00002.safetensors"
ROOT_FILE = "turbo.safetensors"


def _shard(tensors: dict, folder: Path, index_name: str, groups: list[list[str]]) -> None:
    """Write `groups` of keys as shards `<stem>-0000i-of-0000n.safetensors` plus the index."""
    stem = index_name.replace(".safetensors.index.json", "")
    weight_map = {}
    for i, keys in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def build_official_repo(dest: Path) -> Path:
    """The repo's files under `dest` (a fresh folder); returns it."""
    demo = demo_path()
    shutil.copytree(demo, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(demo / "vae" / "diffusion_pytorch_model.safetensors", dest / "vae")
    transformer = load_file(str(demo / "transformer" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(transformer)
    _shard(transformer, dest / "transformer", "diffusion_pytorch_model.safetensors.index.json",
           [keys[: len(keys) // 2], keys[len(keys) // 2:]])
    save_file({diffusers_to_official_key(k): v.contiguous() for k, v in transformer.items()}, str(dest / ROOT_FILE))
    text = load_file(str(demo / "text_encoder" / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    vision = {"visual.patch_embed.proj.weight": torch.randn(32, 3, 2, 16, 16, generator=generator),
              "visual.blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=generator)}
    _shard({**text, **vision}, dest / "text_encoder", "model.safetensors.index.json", [sorted(text), sorted(vision)])
    (dest / "images").mkdir()
    (dest / "images" / "sample.png").write_bytes(b"\x89PNG\r\n\x1a\n not a real image, never fetched")
    (dest / "LICENSE.pdf").write_bytes(b"%PDF-1.4 the Krea 2 community license (stand-in)")
    (dest / "README.md").write_text("# Krea 2 Turbo (test stand-in)\n")
    (dest / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 pickle decoy, never fetched")
    return dest
