"""Builders for GGUF test files: valid random blocks of every block type, and files written with the
`gguf` package's writer (the package cannot quantize K-quants, so their blocks are built directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from krea2_lite.files.gguf_container import BLOCK_TYPES, FLOAT_TYPES

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


def random_model_state(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-key float32 state dict of a random Krea2Transformer of shape `cfg`."""
    from krea2_lite.model import Krea2Transformer

    torch.manual_seed(seed)
    model = Krea2Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


def model_gguf(path: Path, state: dict[str, torch.Tensor], qtype: str, *, prefix: str = "", seed: int = 0,
               rename=None) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write `state` as a GGUF file: each 2-D weight whose rows hold whole `qtype` blocks as `qtype`
    (`qtype` a type name, or a function of the official name giving one; a float type stores it so)
    (the package's quantizer where it has one, else valid random blocks), other 2-D tensors F16, 1-D F32.
    Returns the file and the reference: the package's dequantization of each stored tensor (official names)."""
    from gguf.quants import dequantize, quantize

    type_of = qtype if callable(qtype) else (lambda name: qtype)
    tensors, reference = {}, {}
    for i, (name, value) in enumerate(state.items()):
        stored = (rename or (lambda k: k))(prefix + name)
        qtype = type_of(name)
        if qtype in FLOAT_TYPES:
            tensors[stored] = (qtype, value.to(FLOAT_TYPES[qtype]).numpy() if qtype != "BF16" else bf16_bytes(value))
            reference[name] = value.to(FLOAT_TYPES[qtype]).float()
        elif value.ndim == 2 and value.shape[1] % BLOCK_TYPES[qtype][0] == 0 and name.endswith(".weight"):
            kind = GGMLQuantizationType[qtype]
            try:
                data = quantize(value.numpy(), kind)
            except NotImplementedError:  # K-quants: the package cannot write them
                data = random_blocks(qtype, value.shape[0], value.shape[1], seed=seed + i)
            tensors[stored] = (qtype, data)
            reference[name] = torch.from_numpy(dequantize(data, kind).copy())
        elif value.ndim == 2:
            tensors[stored] = ("F16", value.half().numpy())
            reference[name] = value.half().float()
        else:
            tensors[stored] = ("F32", value.numpy())
            reference[name] = value.clone()
    return write_gguf(path, tensors), reference
