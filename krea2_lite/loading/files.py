"""Find and read safetensors weights: the one place that decides which files hold a model.

`find_weight_files` is the only routine that looks for weights in a folder (an index, single or
several files, refused pickles) and `tensor_locations` the only one that reads their headers into
{key: (file, TensorInfo)}; every loader (transformer, text encoder, VAE, quantized folder) goes
through both. Pickle-based files are refused by name and never opened.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from ..errors import (CheckpointNotFoundError, CorruptCheckpointError, SafetensorsSetError,
                      UnsafeCheckpointFormatError)
from ..files.hub_fetch import NEVER_READ_PREFIXES
from ..jsonfile import parse_json, read_json  # noqa: F401  (read_json re-exported: the one JSON reader)
from ..safetensors_set import check_entry, read_weight_map

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
INDEX_SUFFIX = ".safetensors.index.json"

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class TensorInfo(NamedTuple):
    dtype: str                 # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int                 # absolute byte offsets in the file
    end: int


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointFormatError(
            f"{path}: '{path.suffix}' files are pickle-based and are never opened by krea2_lite "
            "(unpickling can run arbitrary code). Convert the checkpoint to .safetensors first.")


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Validate a safetensors file without reading its tensors; returns {key: TensorInfo}.

    Catches the failures safetensors reports vaguely: empty files, a header longer than the
    file, unparsable JSON, and data offsets past the end of the file (a truncated download).
    """
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path}: the file is empty (0 bytes); re-download or re-save it")
    if size < 8:
        raise CorruptCheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise CorruptCheckpointError(
                f"{path}: the header claims {header_len} bytes but the file has {size}; "
                "this is not a safetensors file, or it is truncated")
        raw = fh.read(header_len)
    try:
        header = parse_json(raw.decode("utf-8"), where=str(path), what="safetensors header")
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    data_len = size - 8 - header_len
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            tensors[key] = TensorInfo(info["dtype"], tuple(info["shape"]), 8 + header_len + start,
                                      8 + header_len + end)
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: malformed header entry for tensor '{key}'") from None
        if end > data_len or start > end:
            raise CorruptCheckpointError(
                f"{path}: tensor '{key}' ends at byte {end} of the data but only {data_len} bytes are "
                "present; the file is truncated (an interrupted download?)")
        check_entry(path, key, *tensors[key][:2], start, end)  # bytes = prod(shape) × dtype size
    return tensors


def open_safetensors(file: Path, device: str = "cpu"):
    """`safe_open` with one clear error for files safetensors cannot read."""
    try:
        return safe_open(str(file), framework="pt", device=device)
    except Exception as exc:  # safetensors raises its own error type (and OSError)
        raise CorruptCheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """Read one tensor with a plain file read into fresh memory (no memory map).

    For streaming work (quantizing while loading): the bytes are released when the tensor is,
    instead of staying mapped — and counted in the process's resident memory — until the file
    is closed.
    """
    dtype = SAFETENSORS_DTYPES.get(info.dtype)
    if dtype is None:
        raise CorruptCheckpointError(f"{path}: unsupported tensor dtype {info.dtype}")
    buffer = torch.empty(info.end - info.start, dtype=torch.uint8)
    with open(path, "rb") as fh:
        fh.seek(info.start)
        if fh.readinto(buffer.numpy()) != len(buffer):
            raise CorruptCheckpointError(f"{path}: short read; the file changed or is truncated")
    return buffer.view(dtype).reshape(info.shape)


@dataclass
class WeightFiles:
    """The safetensors files of one model, and the shard index's {key: file} when there is one."""

    folder: Path
    files: list[Path]
    weight_map: dict[str, Path] | None = None
    index: Path | None = None


def _from_index(index: Path) -> WeightFiles:
    weight_map = read_weight_map(index)  # a JSON object of key → plain shard file name, or a clear error
    folder = index.parent
    shards = {name: folder / name for name in weight_map.values()}
    missing = {name for name, p in shards.items() if not p.is_file()}
    # A shard of tensors krea2_lite never reads (a vision tower) is not fetched from the hub: not needed.
    unread = {name for name in missing
              if all(k.startswith(NEVER_READ_PREFIXES) for k, v in weight_map.items() if v == name)}
    if missing - unread:
        raise CheckpointNotFoundError(f"{index}: lists shards that are missing: {sorted(missing - unread)[:3]}")
    weight_map = {k: v for k, v in weight_map.items() if v not in unread}
    shards = {name: p for name, p in shards.items() if name not in unread}
    return WeightFiles(folder, sorted(set(shards.values())), {k: shards[v] for k, v in weight_map.items()}, index)


def find_weight_files(location: Path, *, preferred: str | None = None, single: bool = False,
                      what: str = "model") -> WeightFiles:
    """The safetensors weights at `location` (a file, or a folder).

    In a folder, in this order: the index `preferred + ".index.json"` or else the only
    `*.safetensors.index.json`; the file `preferred`; every `*.safetensors` (only one allowed
    with `single`). A folder holding only pickle files is refused by name.
    """
    if location.is_file():
        refuse_pickle(location)
        return WeightFiles(location.parent, [location])
    indexes = sorted(location.glob("*" + INDEX_SUFFIX))
    if preferred is not None and (location / (preferred + ".index.json")).is_file():
        return _from_index(location / (preferred + ".index.json"))
    if len(indexes) > 1:
        raise CheckpointNotFoundError(f"{location}: several shard indexes ({', '.join(p.name for p in indexes)}); "
                                      "pass the folder of one model")
    if indexes:
        return _from_index(indexes[0])
    if preferred is not None and (location / preferred).is_file():
        return WeightFiles(location, [location / preferred])
    files = sorted(location.glob("*.safetensors"))
    if single and len(files) > 1:
        raise CheckpointNotFoundError(f"{location}: several .safetensors files "
                                      f"({', '.join(f.name for f in files)}) and no *{INDEX_SUFFIX}")
    if files:
        return WeightFiles(location, files)
    pickles = sorted(p.name for p in location.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointFormatError(
            f"{location}: only pickle-based weights ({', '.join(pickles[:4])}); krea2_lite never unpickles "
            "(it can run arbitrary code). Convert them to .safetensors first.")
    raise CheckpointNotFoundError(f"{location}: no {what} found (expected a .safetensors file or a sharded "
                                  f"*{INDEX_SUFFIX})")


def tensor_locations(weights: WeightFiles) -> dict[str, tuple[Path, TensorInfo]]:
    """{stored key: (file, TensorInfo)} from the headers of `weights` (tensor data is not read).

    With an index, its weight_map says which file holds each key (a key it does not list, or one
    its file lacks, is an error); without one, a key in two files is refused rather than one copy
    winning silently.
    """
    found: dict[str, tuple[Path, TensorInfo]] = {}
    for file in weights.files:
        for key, info in read_safetensors_header(file).items():
            if weights.weight_map is not None:
                if weights.weight_map.get(key) == file:
                    found[key] = (file, info)
                continue
            if key in found:
                raise SafetensorsSetError(f"tensor '{key}' is in both {found[key][0]} and {file}; "
                                          "pass one file, or add an index saying which holds it")
            found[key] = (file, info)
    if weights.weight_map is not None:
        absent = sorted(k for k in weights.weight_map if k not in found)
        if absent:
            raise SafetensorsSetError(f"{weights.index}: lists {len(absent)} tensor(s) their shard does not hold "
                                      f"(first: {absent[:3]})")
    return found
