"""Turn what a user names (a local path or a Hugging Face hub id) into a local path."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointNotFoundError
from .hub_fetch import fetch_ref, parse_hub_ref


def looks_like_hub_id(text: str) -> bool:
    """`owner/name`, `owner/name@rev` or `owner/name/path/in/repo.safetensors`."""
    return parse_hub_ref(text) is not None


def resolve_path(path: str | os.PathLike, allow_patterns: list[str] | None = None, *,
                 parts: tuple[str, ...] | None = None, revision: str | None = None, progress: bool = True) -> Path:
    """A local file or folder as given, or a hub reference fetched by need (`files.hub_fetch`): a repo's
    small files, then the weights of what it is (a pipeline's `parts`, default all; never its root
    single file, never images or pickles), or the one file `owner/name/path/in/repo.safetensors` names.

    `allow_patterns` is kept for older callers and no longer used: what is fetched is decided by need.
    """
    text = os.fspath(path)
    location = Path(text).expanduser()
    if location.exists():
        return location
    if parse_hub_ref(text) is None:
        raise CheckpointNotFoundError(f"{location}: no such file or folder")
    return fetch_ref(text, parts=parts, revision=revision, progress=progress)
