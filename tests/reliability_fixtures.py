"""Shared, read-only inputs for the tests/test_reliability_*.py battery (built once per process).

Tests copy what they damage (`copy_of`) and check with `snapshot` that what they did not mean to
touch is byte-identical afterwards and that nothing was left beside it.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from factories import tiny_diffusers_pipeline


@functools.lru_cache(maxsize=None)
def _scratch() -> Path:
    root = Path(tempfile.mkdtemp(prefix="krea2_reliability_"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.lru_cache(maxsize=None)
def pipeline_folder() -> Path:
    """A tiny random diffusers Krea2Pipeline folder with the demo's own defaults in model_index.json."""
    root = _scratch() / "pipe"
    tiny_diffusers_pipeline().save_pretrained(root)
    index = json.loads((root / "model_index.json").read_text())
    index["krea2_lite"] = {"steps": 3, "guidance": 2.0, "width": 32, "height": 32}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@functools.lru_cache(maxsize=None)
def official_state() -> dict[str, torch.Tensor]:
    """The tiny pipeline's transformer in official names (float32)."""
    from krea2_lite.loading.transformer import load_transformer

    model = load_transformer(pipeline_folder() / "transformer", dtype=torch.float32)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def official_file(path: Path, state: dict | None = None) -> Path:
    save_file(dict(state or official_state()), str(path))
    return path


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst


def snapshot(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (and the names of links and folders)."""
    path = Path(path)
    out = {}
    for item in sorted([path, *path.rglob("*")] if path.is_dir() else [path]):
        rel = str(item.relative_to(path)) if item != path else "."
        if item.is_symlink():
            out[rel] = "link:" + str(item.readlink())
        elif item.is_file():
            out[rel] = hashlib.sha256(item.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def rewrite_header(path: Path, edit) -> None:
    """Apply `edit(header: dict)` to a safetensors file's JSON header in place (same data bytes)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
