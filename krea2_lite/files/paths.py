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
