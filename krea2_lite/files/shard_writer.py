"""Write safetensors shards as tensors arrive, diffusers-style, holding none of them.

The layout (every key, dtype and shape, in writing order) is known before the first tensor is
computed — it is the meta-built quantized model's — so each shard's header is written first and
each tensor's bytes are appended as soon as it exists. Nothing is buffered: memory does not grow
with the shard size. One shard is `NAME.safetensors`; several are `NAME-00001-of-0000N.safetensors`
with `NAME.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {key: file}}).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .dtypes import DTYPE_NAMES

DEFAULT_MAX_SHARD = "2GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MIN_SHARD_BYTES = 10**6  # below 1MB a "shard" is just many files for nothing


def parse_size(text: str) -> int:
    """'500MB', '2GB', '1.5GiB', '123456' → bytes (decimal units, as diffusers; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,15})?)\s*([A-Za-z]*)\s*", str(text)[:100])
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 500MB, 2GB or 1.5GiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < MIN_SHARD_BYTES:
        raise ValueError(f"--max-shard-size {text!r}: must be at least 1MB")
    return size


Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * torch.empty((), dtype=dtype).element_size()


def plan_shards(layout: Layout, max_bytes: int) -> list[Layout]:
    """Consecutive runs of `layout` of at most `max_bytes` each (a larger tensor gets its own)."""
    shards: list[Layout] = [[]]
    size = 0
    for entry in layout:
        n = _nbytes(entry[1], entry[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards if shards[0] else []


def shard_names(name: str, count: int) -> list[str]:
    if count == 1:
        return [f"{name}.safetensors"]
    return [f"{name}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(entries: Layout) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, dtype, shape in entries:
        n = _nbytes(dtype, shape)
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it


class ShardedWriter:
    """`write(key, tensor)` in exactly the planned order; `close()` checks that all came and
    writes the index. Files go into `folder`, which the caller renames into place when done."""

    def __init__(self, folder: Path, name: str, layout: Layout, max_bytes: int):
        self.folder = folder
        self.shards = plan_shards(layout, max_bytes)
        self.names = shard_names(name, len(self.shards))
        self.index_name = f"{name}.safetensors.index.json"
        self.order = [(i, entry) for i, shard in enumerate(self.shards) for entry in shard]
        self.position, self.current, self.handle = 0, -1, None
        self.total = sum(_nbytes(dtype, shape) for _, dtype, shape in layout)
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self.position >= len(self.order):
            raise RuntimeError(f"shard writer: '{key}' is beyond the planned layout")
        shard, (want, dtype, shape) = self.order[self.position]
        if key != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"shard writer: expected '{want}' {dtype} {tuple(shape)}, got '{key}' "
                               f"{tensor.dtype} {tuple(tensor.shape)}")
        if shard != self.current:
            self._open(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.handle.write(memoryview(data.numpy()))
        self.position += 1

    def _open(self, shard: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header = _header(self.shards[shard])
        self.handle = open(self.folder / self.names[shard], "wb")
        self.handle.write(len(header).to_bytes(8, "little") + header)
        self.current = shard

    def close(self) -> list[str]:
        """Finish the last shard and write the index (several shards only); returns the file names."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.position != len(self.order):
            missing = [entry[0] for _, entry in self.order[self.position:self.position + 3]]
            raise RuntimeError(f"shard writer: {len(self.order) - self.position} planned tensors never came "
                               f"(first: {missing})")
        if len(self.names) > 1:
            weight_map = {key: self.names[i] for i, (key, _, _) in self.order}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / self.index_name).write_text(json.dumps(index, indent=1))
            return [*self.names, self.index_name]
        return list(self.names)

    def abort(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
