"""Autotune configs of the matmul-type kernels, one function per kernel, keyed by GPU capability.

Only real GPUs autotune; under the Triton interpreter every kernel uses one fixed small config
(its module's `INTERPRET_CONFIG`). Shared memory per SM bounds the tiles: sm_80 (A100) 164 KB,
sm_86 / sm_89 (RTX 30 / 40, L4, L40) ~100 KB, sm_90 (H100) 228 KB. Configs that still run out
of resources on a given card are dropped by Triton's autotuner. None of these lists has been
timed yet (no GPU in this project's development loop): they are starting points from Triton's
matmul tutorial and the tile/stage limits above; `benchmarks/bench_kernels.py` prints the winners.
"""

from __future__ import annotations

import functools

import torch
import triton


def capability(device: torch.device | None = None) -> tuple[int, int]:
    """(major, minor) of a CUDA device; (0, 0) without CUDA."""
    if not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def _family(cap: tuple[int, int]) -> str:
    if cap >= (9, 0):
        return "sm90"
    if cap in ((8, 6), (8, 7), (8, 9)):
        return "consumer"  # ~100 KB shared memory per SM
    return "sm80"


def _cfg(bm, bn, bk, warps, stages, **extra) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra}, num_warps=warps,
                         num_stages=stages)


def qmatmul_configs(cap: tuple[int, int]) -> list[triton.Config]:
    """Dequant-matmul (bf16/fp16 tensor cores after an in-register dequantization)."""
    common = [
        _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
        _cfg(128, 64, 64, 4, 4), _cfg(64, 64, 64, 4, 3),
        _cfg(16, 128, 128, 4, 3),  # few tokens: weight-bandwidth bound
    ]
    if _family(cap) == "sm90":
        return [_cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3)] + common
    if _family(cap) == "consumer":  # 128×128×64 bf16 tiles: 32 KB a stage, so at most 3 stages in ~100 KB
        return [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 4, 4), _cfg(64, 128, 64, 4, 3),
                _cfg(128, 64, 64, 4, 3), _cfg(64, 64, 64, 4, 4), _cfg(16, 128, 128, 4, 3)]
    return common


def w8a8_configs(cap: tuple[int, int]) -> list[triton.Config]:
    """int8×int8→int32 GEMM: int8 tensor-core MMAs want BLOCK_K ≥ 32 (64–128 to fill the pipe)."""
    g = dict(GROUP_M=8)
    if _family(cap) == "sm90":
        return [_cfg(128, 256, 128, 8, 3, **g), _cfg(256, 128, 128, 8, 3, **g), _cfg(128, 128, 128, 8, 4, **g),
                _cfg(128, 128, 64, 4, 4, **g), _cfg(64, 128, 128, 4, 4, **g), _cfg(16, 128, 256, 4, 3, **g)]
    if _family(cap) == "consumer":
        return [_cfg(128, 128, 64, 4, 4, **g), _cfg(128, 128, 128, 8, 3, **g), _cfg(64, 128, 128, 4, 3, **g),
                _cfg(128, 64, 128, 4, 3, **g), _cfg(64, 64, 128, 4, 4, **g), _cfg(16, 128, 128, 4, 3, **g)]
    return [_cfg(128, 256, 64, 8, 3, **g), _cfg(128, 128, 128, 8, 3, **g), _cfg(128, 128, 64, 4, 4, **g),
            _cfg(64, 128, 128, 4, 4, **g), _cfg(128, 64, 128, 4, 4, **g), _cfg(16, 128, 128, 4, 3, **g)]


def act_quant_configs(cap: tuple[int, int]) -> list[triton.Config]:
    """Per-token quantizer: memory bound; BLOCK_K is fixed by the rotation block (or 128)."""
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in ((16, 4, 2), (32, 4, 2), (64, 4, 2), (64, 8, 3))]


TUNED: dict[tuple[str, tuple[int, int]], object] = {}  # (kernel name, capability) -> Autotuner


@functools.lru_cache(maxsize=None)
def autotuned(kernel, configs_fn, cap: tuple[int, int], key: tuple[str, ...]):
    """`triton.autotune(configs_fn(cap), key)(kernel)`, built once per (kernel, capability)."""
    tuned = triton.autotune(configs=configs_fn(cap), key=list(key))(kernel)
    TUNED[(getattr(kernel, "__name__", str(kernel)), cap)] = tuned
    return tuned
