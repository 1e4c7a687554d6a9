"""Read GGUF containers (the `gguf` package's reader) into checked, torch-ordered tensor entries.

A bottom-layer file reader like `loading.files` for safetensors: it imports nothing above
`errors`. Everything about the GGUF container is decided here, once:
  - shapes: ggml stores dimensions innermost first; entries carry the torch order (reversed),
    or the `comfy.gguf.orig_shape.<name>` shape city96's converter records for reshaped tensors;
  - checks before anything is placed: a known, supported tensor type, an innermost dimension that
    is a whole number of blocks, data inside the file, no overlaps, no duplicate names;
  - `general.architecture` is read (for messages and `inspect`) but never trusted: the config is
    inferred from the shapes, as for safetensors.
The file is memory-mapped copy-on-write: tensors returned by `GGUFFile.raw` are views of the
file's pages (never written back), so stored bytes cost no extra host memory until copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import GGUFFileError, NonFiniteError, UnsupportedFormatError

GGUF_MAGIC = b"GGUF"
# ggml type name → (elements per block, bytes per block); the types krea2_lite dequantizes.
BLOCK_TYPES = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q4_0": (32, 18), "Q4_1": (32, 20),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
# Byte offsets of each block's fp16 scale fields (d, and dmin / m where the type has one), from ggml's block
# layouts; a NaN/inf there turns the whole block into NaN.
SCALE_OFFSETS = {"Q8_0": (0,), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_0": (0,), "Q4_1": (0, 2), "Q2_K": (80, 82),
                 "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


class GGUFTensor(NamedTuple):
    qtype: str                 # ggml type name, e.g. "Q4_K"
    shape: tuple[int, ...]     # torch order (out, in) for a linear weight
    start: int                 # absolute byte offsets in the file
    end: int

    @property
    def quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the innermost dimension) as stored."""
        block, size = BLOCK_TYPES[self.qtype]
        return self.shape[-1] // block * size if self.shape else size


@dataclass
class GGUFFile:
    """One GGUF file's tensors {stored name: GGUFTensor} and its metadata, checked."""

    path: Path
    tensors: dict[str, GGUFTensor]
    architecture: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    _map: np.ndarray | None = None

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor, memory-mapped: float types in their dtype and torch shape; block types
        as uint8 (rows, row_bytes), one row per output feature (for a linear weight)."""
        info = self.tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")  # copy-on-write: never written back
        data = torch.from_numpy(self._map[info.start:info.end])
        if not info.quantized:
            return data.view(FLOAT_TYPES[info.qtype]).reshape(info.shape)
        return data.reshape(-1, info.row_bytes)

    def close(self) -> None:
        self._map = None


def check_block_scales(raw: torch.Tensor, qtype: str, where: str) -> None:
    """NonFiniteError naming `where` (file and tensor) when any block's fp16 scale is NaN/inf; `raw` is the
    stored bytes (GGUFFile.raw). Reads only the scale bytes' pages, which the load copies anyway."""
    offsets = SCALE_OFFSETS.get(qtype, ())
    if not offsets:
        return
    blocks = raw.reshape(-1, BLOCK_TYPES[qtype][1])
    for offset in offsets:
        scales = blocks[:, offset:offset + 2].contiguous().view(torch.float16)
        bad = (~torch.isfinite(scales)).nonzero()
        if len(bad):
            raise NonFiniteError(f"{where}: block {int(bad[0, 0])} of {len(blocks)} has a NaN/inf scale "
                                 f"({qtype}, byte {offset} of the block); the file is damaged")


def is_gguf(path: Path) -> bool:
    """A file that starts with the GGUF magic (recognised by content, not by its name)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except (OSError, IsADirectoryError):
        return False


def _reader(path: Path):
    """The package's reader; its ValueErrors (bad magic or version, duplicate names, a truncated
    tensor) become GGUFFileError naming the file. Each tensor is first checked by `_check_fields`."""
    from gguf import GGUFReader

    class CheckedReader(GGUFReader):
        def _build_tensors(self, start_offs, fields):
            _check_fields(path, start_offs, fields, len(self.data))
            return super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path, mode="r")
    except (GGUFFileError, UnsupportedFormatError):
        raise
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise GGUFFileError(f"{path}: not a readable GGUF file ({exc})") from None


def _check_fields(path: Path, start: int, fields, file_size: int) -> None:
    """Each tensor's type, shape and byte range, before the package builds any array."""
    from gguf import GGMLQuantizationType

    seen, ranges = set(), []
    for f in fields:
        _, name_data, _, dims, raw_type, offset = f.parts
        name = bytes(name_data).decode("utf-8", errors="replace")
        if name in seen:
            raise GGUFFileError(f"{path}: tensor '{name}' is stored twice; a GGUF file holds each name once")
        seen.add(name)
        code = int(raw_type[0])
        try:
            qtype = GGMLQuantizationType(code).name
        except ValueError:
            raise UnsupportedFormatError(f"{path}: tensor '{name}' has ggml type {code}, which no GGUF reader "
                                         "knows (a newer or corrupt file)") from None
        if qtype not in BLOCK_TYPES:
            raise UnsupportedFormatError(f"{path}: tensor '{name}' is stored as {qtype}; krea2_lite reads "
                                         f"{', '.join(BLOCK_TYPES)} (re-quantize the file to one of them)")
        block, size = BLOCK_TYPES[qtype]
        dims = [int(d) for d in dims]
        if not dims or any(d <= 0 for d in dims) or dims[0] % block:
            raise GGUFFileError(f"{path}: tensor '{name}' ({qtype}) has dimensions {dims[::-1]}; its innermost "
                                f"dimension must be a positive multiple of the {block}-element block")
        nbytes = int(np.prod(dims, dtype=np.uint64)) // block * size
        begin = start + int(offset[0])
        if begin + nbytes > file_size:
            raise GGUFFileError(f"{path}: tensor '{name}' needs bytes {begin}..{begin + nbytes} but the file has "
                                f"{file_size}; the file is truncated (an interrupted download?)")
        ranges.append((begin, begin + nbytes, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise GGUFFileError(f"{path}: tensors '{first}' and '{second}' overlap in the file; their byte counts "
                                "do not match their types and shapes")


def _field_value(field):
    """A metadata field as a Python value (strings decoded, 1-element arrays unwrapped)."""
    from gguf import GGUFValueType

    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return [field.parts[i].tolist()[0] if len(field.parts[i]) == 1 else bytes(field.parts[i]).decode()
                for i in field.data]
    values = [field.parts[i].tolist() for i in field.data]
    flat = [v for part in values for v in (part if isinstance(part, list) else [part])]
    return flat[0] if len(flat) == 1 else flat


def read_gguf(path: str | Path) -> GGUFFile:
    """Open and check a GGUF file; reads its header only (tensor data stays on disk)."""
    path = Path(path)
    reader = _reader(path)
    metadata = {}
    for key, fld in reader.fields.items():
        if not key.startswith("GGUF."):
            try:
                metadata[key] = _field_value(fld)
            except (IndexError, UnicodeDecodeError):
                metadata[key] = None  # an unreadable value is only ever shown, never used
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        orig = metadata.get(ORIG_SHAPE_KEY + t.name)
        float_type = t.tensor_type.name in FLOAT_TYPES
        if float_type and isinstance(orig, list) and orig and int(np.prod(orig)) == int(np.prod(shape)):
            shape = tuple(int(d) for d in orig)  # city96's converter flattens some float tensors
        tensors[t.name] = GGUFTensor(t.tensor_type.name, shape, int(t.data_offset), int(t.data_offset) + int(t.n_bytes))
    arch = metadata.get("general.architecture")
    del reader  # its memmap is closed with it; `GGUFFile.raw` maps copy-on-write itself
    return GGUFFile(path, tensors, arch if isinstance(arch, str) else None, metadata)
