"""Turn what a user names (a local path or a Hugging Face hub id) into a local path."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointNotFoundError
from .hub_fetch import cache_dir, fetch_ref, parse_hub_ref


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


def is_cached_hub_id(text: str, revision: str | None = None) -> bool:
    """True when a hub reference's files are already in the local Hugging Face cache (no download
    needed): the file it names, or the repo's model_index.json / config.json / adapter_config.json,
    at `revision` (a PNG's recorded commit) when the reference itself names none."""
    ref = parse_hub_ref(text)
    if ref is None:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a hard dependency
        return False
    names = (ref.path,) if ref.path else ("model_index.json", "config.json", "adapter_config.json")
    return any(isinstance(try_to_load_from_cache(ref.repo_id, name, revision=ref.revision or revision,
                                                             cache_dir=cache_dir()), str) for name in names)
