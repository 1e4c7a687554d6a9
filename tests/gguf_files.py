"""Builders for GGUF test files: valid random blocks of every block type, and files written with the
`gguf` package's writer (the package cannot quantize K-quants, so their blocks are built directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from krea2_lite.gguf_file import BLOCK_TYPES, FLOAT_TYPES

# Byte offsets of each block's float16 scales (d, and dmin / m where the type has one).
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
                 "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
QUANT_TYPES = tuple(SCALE_OFFSETS)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    """(rows, cols / block · bytes) uint8: random bits with small finite float16 scales in place."""
    block, size = BLOCK_TYPES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        d = (rng.uniform(0.2, 1.0, size=(rows, cols // block)) * scale).astype(np.float16)
        data[..., offset:offset + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]], arch: str = "krea2") -> Path:
    """Write {name: (ggml type, array)} (float arrays in torch order; block types as (rows, bytes))."""
    writer = GGUFWriter(str(path), arch)
    for name, (qtype, array) in tensors.items():
        kind = GGMLQuantizationType[qtype]
        if qtype in FLOAT_TYPES and qtype != "BF16":
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def bf16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(*t.shape[:-1], -1)
