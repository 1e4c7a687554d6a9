"""GGUF block types → float, in torch, on the tensor's own device (block layouts as ggml defines them).

One small function per type, each taking the blocks as uint8 (n, bytes per block) and returning
float32 (n, elements per block); `DEQUANTIZERS` is the table. The arithmetic is the same, in the
same order and in float32, as the `gguf` package's `gguf.quants.dequantize` (the tests' reference),
so the results are equal bit for bit. Scales d / dmin are float16 inside each block.
"""

from __future__ import annotations

import torch

from ..files.gguf_container import BLOCK_TYPES, FLOAT_TYPES

QK_K = 256


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Low nibbles of each `width`-byte run, then its high nibbles: (n, groups, 2·width) uint8."""
    qs = qs.reshape(qs.shape[0], groups, 1, width)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(qs.shape[0], groups, 2 * width)


def _bits(packed: torch.Tensor, count: int, step: int, mask: int) -> torch.Tensor:
    """Fields of `step` bits: for each shift s in 0, step, … (count of them) the whole byte run >> s & mask,
    stacked shift-major: (n, groups, count, width)."""
    shifts = torch.arange(0, count * step, step, dtype=torch.uint8, device=packed.device).reshape(1, 1, count, 1)
    return (packed.unsqueeze(2) >> shifts) & mask


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 1, 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 1, 16).reshape(b.shape[0], 32).float()
    return _f16(b, 0) * q + _f16(b, 2)


def _high_bit(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1: bit i of the little-endian 32-bit qh is element i's fifth bit → (n, 32) uint8."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).reshape(1, 1, 8)
    return ((qh.unsqueeze(2) >> shifts) & 1).reshape(qh.shape[0], 32)


def _q5(b: torch.Tensor, offset: int) -> torch.Tensor:
    low = _nibbles(b[:, offset + 4:], 1, 16).reshape(b.shape[0], 32)
    return low | (_high_bit(b[:, offset:offset + 4]) << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_q5(b, 2).to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _q5(b, 4).float() + _f16(b, 2)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), 4, 2, 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _bits(packed[:, :8].reshape(n, 1, 8), 2, 4, 0x0F).reshape(n, 16)
    high = _bits(packed[:, 8:].reshape(n, 1, 4), 4, 2, 0x03).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 4, 2, 3).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), 8, 1, 1).reshape(n, 16, 16) ^ 1  # a set bit means no −4 offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes → two (n, 8) uint8."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    return d, dm


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dm = _k_scales(b)
    q = _nibbles(b[:, 16:], 4, 32).reshape(b.shape[0], 8, 32).float()
    return (d * q - dm).reshape(b.shape[0], QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k_scales(b)
    low = _nibbles(b[:, 48:], 4, 32).reshape(n, 8, 32)
    high = _bits(b[:, 16:48].reshape(n, 1, 32), 8, 1, 1).reshape(n, 8, 32)
    return (d * (low | (high << 4)).float() - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    low = _nibbles(ql, 2, 64).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), 4, 2, 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


DEQUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k,
                "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize_gguf(data: torch.Tensor, qtype: str, shape: tuple[int, ...],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored GGUF bytes (uint8, any shape holding whole blocks; float types in their dtype) → the
    tensor of torch shape `shape` in `dtype`, computed in float32 on `data`'s device."""
    if qtype in FLOAT_TYPES:
        return data.view(FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    block, size = BLOCK_TYPES[qtype]
    blocks = data.reshape(-1, size)
    return DEQUANTIZERS[qtype](blocks).reshape(shape).to(dtype)


def gguf_linear_torch(x: torch.Tensor, qdata: torch.Tensor, qtype: str, out_features: int, in_features: int,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + bias with W stored as GGUF blocks (uint8 (out, row bytes)): W dequantized in float32
    on qdata's device, cast to x.dtype, then one `F.linear` (the reference of the Triton kernel)."""
    weight = dequantize_gguf(qdata, qtype, (out_features, in_features), x.dtype)
    return torch.nn.functional.linear(x, weight, bias)
