"""A small safetensors file read whole into fresh tensors (training caches and checkpoints), its
header validated first (`safetensors_headers`); a damaged file is a CorruptCheckpointError naming it."""

from __future__ import annotations

from pathlib import Path

import torch

from .safetensors_headers import read_safetensors_header, read_tensor


def read_small_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    return {key: read_tensor(path, info) for key, info in read_safetensors_header(path).items()}
