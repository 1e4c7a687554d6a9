"""One safetensors file: its header validated without reading tensors, and its tensors read.

What this guards against (all silent before): a header whose byte range disagrees with its shape
and dtype (a relabelled dtype reads garbage), offsets past the end of the file (a truncated
download), and integer or bool tensors where the model holds floats (they were cast and used).
Every error names the file.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from ..errors import CorruptCheckpointError, SafetensorsSetError
from .dtypes import FLOAT_NAMES, ITEM_BYTES, SAFETENSORS_DTYPES
from .jsonfile import parse_json

MAX_HEADER_BYTES = 100_000_000


class TensorInfo(NamedTuple):
    dtype: str                 # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int                 # absolute byte offsets in the file
    end: int


def check_entry(path: Path, key: str, dtype: str, shape, start: int, end: int) -> None:
    """A header entry's byte range must hold exactly prod(shape) elements of `dtype`."""
    if dtype not in ITEM_BYTES:
        raise SafetensorsSetError(f"{path}: tensor '{key}' has unknown dtype {dtype!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SafetensorsSetError(f"{path}: tensor '{key}' has an invalid shape {list(shape)}")
    want = math.prod(shape) * ITEM_BYTES[dtype]
    if end - start != want:
        raise SafetensorsSetError(
            f"{path}: tensor '{key}' is {dtype} {list(shape)} = {want} bytes, but its header gives it "
            f"{end - start} bytes; the header was edited or the file is damaged")


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
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
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


def require_float(entries: dict[str, tuple[Path, object]], names=None) -> None:
    """Refuse integer / bool tensors among `names` (default: all) of a {key: (file, ..., TensorInfo)} map
    (`weight_files.tensor_locations`)."""
    for key in (entries if names is None else names):
        file, info = entries[key][0], entries[key][-1]
        if info.dtype not in FLOAT_NAMES:
            raise SafetensorsSetError(
                f"{file}: tensor '{key}' is stored as {info.dtype}, but the model expects floating point "
                f"({'/'.join(FLOAT_NAMES)}); the file is not a float checkpoint of this model")
