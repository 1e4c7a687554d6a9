"""Fetch from the Hugging Face hub exactly the files a load reads, and say so before doing it.

A hub reference is `owner/name` (a repo), optionally `owner/name@REVISION`, or one file of a repo:
`owner/name[@REVISION]/path/in/repo.safetensors`. Opening a repo fetches its small files only
(configs, shard indexes, tokenizer: no weights, images, documents or pickles). The caller then
names the folders and files its load reads (`HubFetcher.need`), and `HubFetcher.fetch` prints what
will be fetched (sizes from the hub's tree listing), what is cached and the free disk, refuses a
download that cannot fit before it starts, and downloads the rest with huggingface_hub (its progress
bars, its resume of an interrupted file). A pipeline repo's root single-file transformer is never
fetched for its diffusers layout, and a shard holding only tensors krea2_lite never reads (Qwen3-VL's
vision tower) is skipped.

The environment is read at each call (HF_ENDPOINT, HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, HF_TOKEN),
not when huggingface_hub was imported. Every hub failure becomes one typed error (`errors.HubError`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import (CheckpointNotFoundError, DiskSpaceError, HubAccessError, HubConnectionError, HubNotFoundError,
                      HubOfflineError, JsonFileError, UnsafeCheckpointFormatError)

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SMALL_PATTERNS = ["*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
# Never fetched as "small": weights (fetched by need), pickles (never), sample images and documents.
NOT_SMALL = ["*.safetensors", "*.gguf", *("*" + s for s in PICKLE_SUFFIXES), "images/*", "*.png", "*.jpg",
             "*.jpeg", "*.webp", "*.pdf", "*.md", ".gitattributes"]
# Tensors krea2_lite never reads (Qwen3-VL's vision tower, the LM head): a shard holding only these is skipped.
NEVER_READ_PREFIXES = ("visual.", "model.visual.", "lm_head.")
PREFERRED = ("model.safetensors", "diffusion_pytorch_model.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"
_REPO = r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"
_REF = re.compile(rf"({_REPO})(?:@([\w.-]+))?(?:/(.+))?")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None
    path: str | None = None     # one file in the repo, or None for the repo itself


def parse_hub_ref(text: str) -> HubRef | None:
    """A HubRef for `owner/name[@rev]` or `owner/name[@rev]/dir/file.safetensors` (.gguf); else None."""
    match = _REF.fullmatch(text)
    if match is None or text.startswith((".", "/", "~")) or "\\" in text:
        return None
    repo_id, revision, path = match.groups()
    if path is not None and (not path.lower().endswith(WEIGHT_SUFFIXES) or ".." in path.split("/")):
        return None
    return HubRef(repo_id, revision, path)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder` (its nearest existing parent)."""
    folder = folder.absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def human(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass
class Snapshot:
    """One repo at one commit: its cache folder and the size of every file (from the hub's tree)."""

    repo_id: str
    commit: str
    folder: Path
    sizes: dict[str, int]

    def children(self, rel: str) -> list[str]:
        """Repo paths of the files directly inside folder `rel` ("" = the root), listed or cached."""
        parent = PurePosixPath(rel or ".")
        listed = {p for p in self.sizes if PurePosixPath(p).parent == parent}
        local = self.folder / rel
        if local.is_dir():
            listed |= {f"{rel}/{f.name}" if rel else f.name for f in local.iterdir() if f.is_file()}
        return sorted(listed)


def _quiet_tqdm():
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Quiet(hub_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index lists, less those holding only tensors krea2_lite never reads."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        keys_of: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            keys_of.setdefault(shard, []).append(key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise JsonFileError(f"{index}: not a readable shard index ({type(exc).__name__}: {exc})") from None
    return sorted(s for s, keys in keys_of.items() if not all(k.startswith(NEVER_READ_PREFIXES) for k in keys))


class HubFetcher:
    """Opens hub references (small files only), collects the weight files a load reads, then fetches them.

    Use: `path = hub.resolve(ref)` for each thing named (a local path comes back as it is), `hub.need(path)`
    for each component the load reads, then `hub.fetch()` once; `hub.where(path)` says which snapshot
    (repo, commit) a path lies in.
    """

    def __init__(self, *, progress: bool = True):
        self.progress = progress
        self._snapshots: list[Snapshot] = []
        self._planned: dict[tuple[str, str], Snapshot] = {}   # (repo, path) → snapshot

    # ---- opening -------------------------------------------------------------------------------
    def resolve(self, path, revision: str | None = None, *, small: list[str] | None = None) -> Path:
        """A local file or folder as given; a hub reference opened (small files only) → its cache path."""
        text = os.fspath(path)
        location = Path(text).expanduser()
        if location.exists() or self.where(location) is not None:  # local, or in a snapshot: fetched by need
            return location
        ref = parse_hub_ref(text)
        if ref is None:
            raise CheckpointNotFoundError(f"{location}: no such file or folder")
        if ref.path is not None:  # one file: its folder's configs come with it (a diffusers config.json)
            parent = str(PurePosixPath(ref.path).parent)
            small = [f"{parent}/*.json" if parent != "." else "*.json"]
        snapshot = self.open_repo(ref.repo_id, ref.revision or revision, small=small)
        if ref.path is not None:
            if snapshot.sizes and ref.path not in snapshot.sizes:
                raise HubNotFoundError(f"'{text}': the hub repo {ref.repo_id} (commit {snapshot.commit[:12]}) has no "
                                       f"file {ref.path}")
            return snapshot.folder / ref.path
        return snapshot.folder

    def open_repo(self, repo_id: str, revision: str | None = None, *, small: list[str] | None = None) -> Snapshot:
        """Resolve `revision` to a commit and fetch the repo's small files (all of them, or `small`)."""
        import huggingface_hub  # looked up at call time: tests replace snapshot_download to forbid the hub

        try:
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=small or SMALL_PATTERNS, ignore_patterns=NOT_SMALL,
                local_files_only=offline(), endpoint=os.environ.get("HF_ENDPOINT") or None,
                cache_dir=cache_dir(), tqdm_class=_quiet_tqdm()))
        except Exception as exc:
            raise self._error(exc, repo_id, revision) from None
        sizes = {}
        try:
            tree = huggingface_hub.get_cached_repo_tree(repo_id, revision=folder.name, cache_dir=cache_dir())
            sizes = {f.path: int(f.size) for f in tree}
        except Exception:  # no cached listing (a cache filled by an older client): sizes stay unknown
            pass
        snapshot = Snapshot(repo_id, folder.name, folder, sizes)
        self._snapshots.append(snapshot)
        return snapshot

    def _error(self, exc: BaseException, repo_id: str, revision: str | None, what: str | None = None):
        from .hub_errors import translate

        return translate(exc, repo_id, revision, endpoint=endpoint(), offline=offline(), cache=str(cache_dir()),
                         what=what)

    def where(self, path) -> tuple[Snapshot, str] | None:
        """(snapshot, repo path) when `path` lies in an opened hub snapshot; None for a local path."""
        absolute = Path(os.path.abspath(path))
        for snapshot in self._snapshots:
            try:
                rel = absolute.relative_to(os.path.abspath(snapshot.folder)).as_posix()
            except ValueError:
                continue
            return snapshot, "" if rel == "." else rel
        return None

    # ---- choosing --------------------------------------------------------------------------------
    def need(self, path, parts: tuple[str, ...] | None = None) -> None:
        """Plan the weights a load reads at `path` (nothing when it is local): a weight file itself; a
        pipeline root's component folders (`parts`, default: every one it lists), never its root single
        file; any other folder's own weights (by its index, its preferred file, or every file in it)."""
        found = self.where(path)
        if found is None:
            return
        snapshot, rel = found
        for file in self._weights(snapshot, rel, parts):
            self._planned[(snapshot.repo_id, file)] = snapshot

    def _weights(self, snapshot: Snapshot, rel: str, parts) -> list[str]:
        if rel.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafeCheckpointFormatError(f"{snapshot.repo_id}/{rel}: pickle-based files are never fetched or "
                                              "opened by krea2_lite (unpickling can run arbitrary code)")
        if rel.lower().endswith(WEIGHT_SUFFIXES):
            return [rel]
        folder = snapshot.folder / rel
        prefix = f"{rel}/" if rel else ""
        if (folder / "model_index.json").is_file():  # a diffusers pipeline: its components, not root files
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
            names = parts or [k for k, v in index.items() if isinstance(v, list) and not k.startswith("_")]
            return [f for name in names for f in self._folder_weights(snapshot, prefix + name)]
        if (folder / "krea2_lite.json").is_file():  # a quantized folder: every component it wrote
            return [p for p in snapshot.sizes if p.startswith(prefix) and p.endswith(WEIGHT_SUFFIXES)
                    and not p.startswith(prefix + "images/")]
        return self._folder_weights(snapshot, rel)

    def _folder_weights(self, snapshot: Snapshot, rel: str) -> list[str]:
        """The weight files of one model folder, chosen as `loading.files.find_weight_files` reads them."""
        children = snapshot.children(rel)
        prefix = f"{rel}/" if rel else ""
        indexes = [c for c in children if c.endswith(INDEX_SUFFIX)]
        preferred = [prefix + name + ".index.json" for name in PREFERRED if prefix + name + ".index.json" in indexes]
        index = preferred[0] if preferred else (indexes[0] if len(indexes) == 1 else None)
        if index is not None:
            return [prefix + shard for shard in _index_shards(snapshot.folder / index)]
        weights = [c for c in children if c.lower().endswith(WEIGHT_SUFFIXES)]
        chosen = [prefix + name for name in PREFERRED if prefix + name in weights]
        return chosen[:1] or weights

    # ---- fetching --------------------------------------------------------------------------------
    def planned(self) -> list[tuple[Snapshot, str]]:
        return [(snapshot, path) for (_, path), snapshot in self._planned.items()]

    def fetch(self) -> None:
        """Say what this load fetches, check the disk, then download what the cache lacks."""
        planned = self.planned()
        if not planned:
            return
        todo = [(s, p) for s, p in planned if not (s.folder / p).is_file()]
        if self.progress:
            self._announce(planned, todo)
        if todo and offline():
            from .hub_errors import offline_error

            names = ", ".join(p for _, p in todo[:3]) + (f" and {len(todo) - 3} more" if len(todo) > 3 else "")
            raise offline_error(todo[0][0].repo_id, todo[0][0].commit[:12], f"{len(todo)} file(s) ({names})",
                                str(cache_dir()))
        needed = sum(s.sizes.get(p, 0) for s, p in todo)
        free = free_bytes(cache_dir())
        if needed > free:
            raise DiskSpaceError(f"not enough disk space: this load fetches {human(needed)} into the hub cache "
                                 f"{cache_dir()}, which has {human(free)} free; free some space or set HF_HUB_CACHE "
                                 "to a folder on a larger disk")
        for snapshot in {id(s): s for s, _ in todo}.values():
            self._download(snapshot, [p for s, p in todo if s is snapshot])
        self._planned.clear()

    def _download(self, snapshot: Snapshot, paths: list[str]) -> None:
        import huggingface_hub

        try:  # a commit hash: no revision look-up; huggingface_hub resumes a file's .incomplete part
            huggingface_hub.snapshot_download(
                snapshot.repo_id, revision=snapshot.commit, allow_patterns=paths, cache_dir=cache_dir(),
                endpoint=os.environ.get("HF_ENDPOINT") or None, tqdm_class=None if self.progress else _quiet_tqdm())
        except Exception as exc:
            raise self._error(exc, snapshot.repo_id, snapshot.commit[:12], paths[0]) from None
        missing = [p for p in paths if not (snapshot.folder / p).is_file()]
        if missing:
            raise HubNotFoundError(f"{snapshot.repo_id}@{snapshot.commit[:12]}: the hub did not provide {missing[:3]}")

    def _announce(self, planned, todo) -> None:
        """Before the first large file: each file, its size and state; totals; the free disk."""
        lines = ["krea2_lite: this load reads these files from the Hugging Face hub:"]
        for snapshot, path in planned:
            state = "to fetch" if (snapshot, path) in todo else "cached"
            lines.append(f"  {snapshot.repo_id}@{snapshot.commit[:12]}  {path}  {human(snapshot.sizes.get(path))}  "
                         f"{state}")
        fetch_bytes = sum(s.sizes.get(p, 0) for s, p in todo)
        cached_bytes = sum(s.sizes.get(p, 0) for s, p in planned if (s, p) not in todo)
        lines.append(f"krea2_lite: to fetch {len(todo)} file(s), {human(fetch_bytes)}; already cached "
                     f"{len(planned) - len(todo)} file(s), {human(cached_bytes)}; free disk at {cache_dir()}: "
                     f"{human(free_bytes(cache_dir()))}")
        print("\n".join(lines), file=sys.stderr, flush=True)


def fetch_ref(text: str, *, parts: tuple[str, ...] | None = None, revision: str | None = None,
              progress: bool = True) -> Path:
    """One hub reference, fetched by need on its own (a transformer, a LoRA, a quantize source)."""
    hub = HubFetcher(progress=progress)
    path = hub.resolve(text, revision)
    hub.need(path, parts)
    hub.fetch()
    return path
