"""The on-disk quantized folder: a manifest, the transformer in optimum-quanto's layout, and
(when made from a whole pipeline) the other components.

  DIR/krea2_lite.json                  manifest: format version, source, config, recipe, variant
  DIR/transformer/model.safetensors    float tensors under official names; quantized linears
                                       under optimum-quanto's keys (`….weight._data`, `._scale`);
                                       or, above --max-shard-size, model-0000i-of-0000N.safetensors
                                       shards + model.safetensors.index.json (diffusers-style)
  DIR/transformer/quantization_map.json   optimum-quanto's map {module: {"weights": qtype}}
  DIR/text_encoder/, DIR/vae/, DIR/scheduler/   present when the source was a pipeline

This module knows the names and the manifest (plain JSON); the recipe inside it is read by
`loading.transformer.manifest_spec`, the tensors written by `loading.quantized_writer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import FormatVersionError
from .jsonfile import read_json

FORMAT = "krea2_lite.quantized"
# Each folder records the oldest version that reads it correctly (`required_version`), so older
# krea2_lite keeps reading what it can:
#   1  one transformer/model.safetensors, weight-only or W8A8 (older readers run W8A8 as
#      weight-only, which is correct, just not W8A8)
#   2  W8A8 with a Hadamard rotation (`quant.rotate` > 0, weights stored as W·H), which an older
#      reader would run without the rotation
#   3  a sharded transformer/ (index + shards), which a version-2 reader would call incomplete
#   4  int4 with a low-rank correction (`quant.lowrank` > 0, `<layer>.lowrank.up/down` tensors),
#      which a version-3 reader would build as plain int4 and then refuse for unexpected keys
# (int4's `quant.rounding` needs no version: it changes how codes were chosen, not what they mean.)
FORMAT_VERSION = 4
MANIFEST = "krea2_lite.json"
TRANSFORMER_DIR = "transformer"
TRANSFORMER_NAME = "model.safetensors"
TRANSFORMER_FILE = f"{TRANSFORMER_DIR}/{TRANSFORMER_NAME}"
TRANSFORMER_INDEX = f"{TRANSFORMER_DIR}/{TRANSFORMER_NAME}.index.json"
QUANTIZATION_MAP = "transformer/quantization_map.json"


def required_version(manifest: dict) -> int:
    """The oldest format version that reads this manifest correctly."""
    if manifest.get("quant", {}).get("lowrank"):
        return 4
    if manifest.get("components", {}).get("transformer", {}).get("shards", 1) > 1:
        return 3
    return 2 if manifest.get("quant", {}).get("rotate") else 1


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest last: its `written` list names every file in `folder` (and itself), so a later
    `--force` knows which files are ours and which the user added."""
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) + [MANIFEST]
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": required_version(manifest),
                                               **manifest, "written": sorted(set(written))}, indent=1))


# What folders written before the `written` list held (besides files under these folders).
_OLDER_OUTPUT_TOP = ("transformer", "text_encoder", "vae", "scheduler", "tokenizer")


def written_files(folder: Path) -> set[str] | None:
    """The files (relative, '/'-separated) the manifest says krea2_lite wrote into `folder`; for an
    older manifest without that list, the files under its component folders; None when the manifest
    cannot be read or its list is not a list of strings."""
    try:
        manifest = read_json(folder / MANIFEST, what="quantized-folder manifest")
    except Exception:  # noqa: BLE001 - any damage means: not provably ours
        return None
    listed = manifest.get("written")
    if listed is None:
        return {MANIFEST} | {p.relative_to(folder).as_posix() for top in _OLDER_OUTPUT_TOP
                             for p in (folder / top).rglob("*") if p.is_file() and not p.is_symlink()}
    if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
        return None
    return set(listed)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    manifest = read_json(path, what="quantized-folder manifest")
    if manifest.get("format") != FORMAT:
        raise FormatVersionError(f"{path}: not a krea2_lite quantized folder (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(f"{path}: format version {version!r} is newer than this krea2_lite reads "
                                 f"({FORMAT_VERSION}); upgrade krea2_lite")
    return manifest


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def is_quantized_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()
