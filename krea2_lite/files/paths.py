"""Turn what a user names (a local path or a Hugging Face hub id) into a local path."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointNotFoundError

# What a hub download fetches by default: configs and safetensors weights, never pickles.
DEFAULT_PATTERNS = ["*.json", "*.safetensors", "*/*.json", "*/*.safetensors"]


def looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "/"))


def resolve_path(path: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """A local file or folder as given, or a Hugging Face hub id downloaded with huggingface_hub.

    Only files matching `allow_patterns` are fetched (weights as safetensors, never pickles).
    """
    text = os.fspath(path)
    location = Path(text).expanduser()
    if location.exists():
        return location
    if not looks_like_hub_id(text):
        raise CheckpointNotFoundError(f"{location}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a hard dependency
        raise CheckpointNotFoundError(f"{text}: no such path, and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(text, allow_patterns=allow_patterns or DEFAULT_PATTERNS))
    except Exception as exc:
        raise CheckpointNotFoundError(
            f"'{text}' is not a local path, and fetching it from the Hugging Face hub failed: "
            f"{type(exc).__name__}: {exc}") from None


def local_identity(path: str | os.PathLike) -> tuple[str, int] | None:
    """(absolute path, bytes of its safetensors weights) of a local model or LoRA, None when `path`
    is not local. The size is cheap to recompute and tells a replaced or different model apart
    (a PNG records it so `--from-png` can refuse a model that is not the one that drew it)."""
    location = Path(os.fspath(path)).expanduser()
    if not location.exists():
        return None
    location = location.resolve()
    if location.is_file():
        return str(location), location.stat().st_size
    return str(location), sum(f.stat().st_size for f in sorted(location.rglob("*.safetensors")) if f.is_file())


def is_cached_hub_id(text: str) -> bool:
    """True when the hub id's files are already in the local Hugging Face cache (no download needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    for name in ("model_index.json", "config.json", "adapter_config.json"):
        found = try_to_load_from_cache(text, name)
        if isinstance(found, str):
            return True
    return False
