"""Low-rank corrected int4 (`quant="int4-lr32"`): W ≈ dequant(Q) + U·V, U·V of rank r in bf16.

Trained weights have a decaying spectrum and a few input channels with outliers; those inflate
the scale of every int4 group they fall in. A rank-r branch L = U·V that takes the dominant
directions leaves W − L with a much smaller range, which int4 rounds far better.

Finding L (per layer, while the checkpoint streams, one layer in memory at a time):
  L₀ = best rank-r approximation of W (SVD);
  repeat `iterations` times: Q = int4(W − L), L = best rank-r approximation of W − dequant(Q)
  (the quantization error plus what L already held), keeping the L of lowest ‖W − dequant(Q) − L‖;
  finally Q = int4(W − L).
U and V are rounded to bf16 before each residual is formed, so the stored int4 values are those
of W minus exactly the stored branch. The SVD is exact for small layers and a seeded randomized
one (range finder + power iterations) for large ones, so a layer quantizes to the same bits on
the fly and in `python -m krea2_lite.quantize` (same machine). Host memory: one float32 copy of
the layer (the SVD's input, refilled each round) plus a row slice's temporaries.

At run time the branch is one more unmerged low-rank term in `lora/adapters.py`'s hook (factor 1,
fused with any loaded LoRA's). On disk it is two ordinary tensors of the layer's state dict,
`<layer>.lowrank.down` (r, in) and `<layer>.lowrank.up` (out, r).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.qmatmul_torch import dequantize_weight
from ..lora import adapters
from .int4_rounding import DEFAULT_ROUNDING
from .qlinear import CHUNK_ELEMENTS, QuantizedLinear, quantize_weight_tensors
from .recipe import check_rank_fits

ITERATIONS = 3  # alternations after the first SVD; see benchmarks/RESULTS.md "int4-lr" for the sweep
BRANCH_DTYPE = torch.bfloat16  # what is stored; run in the model's activation dtype

OVERSAMPLE, POWER_ITERATIONS, SEED = 16, 3, 0


class LowRankBranch(nn.Module):
    """The buffers of a layer's correction: down V (rank, in), up U (out, rank)."""

    def __init__(self, rank: int, in_features: int, out_features: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.register_buffer("down", torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.register_buffer("up", torch.zeros(out_features, rank, dtype=dtype, device=device))


def top_directions(e: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of e (out, in) float32 → (up (out, r), down (r, in)), √S on each side
    so both factors have a similar range in bf16."""
    if 2 * (rank + OVERSAMPLE) >= min(e.shape):  # a narrow layer: the full SVD costs about the same
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(e, rank + OVERSAMPLE)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _randomized_svd(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko et al.'s range finder with power iterations, from a fixed seed (deterministic)."""
    generator = torch.Generator(device=a.device).manual_seed(SEED)
    q = torch.randn(a.shape[1], k, generator=generator, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ q).Q
    for _ in range(POWER_ITERATIONS):  # re-orthonormalised each time: the spectrum decays fast
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return q @ ub, s, vh


def _int4_error(residual: torch.Tensor, group: int, scale_dtype: torch.dtype,
                rounding: str = DEFAULT_ROUNDING) -> torch.Tensor:
    """dequant(int4(residual)) − residual, float32 (through the real quantizer)."""
    out, inp = residual.shape
    qdata, scale, shift = quantize_weight_tensors(residual, "int4", group, scale_dtype, rounding=rounding)
    deq = dequantize_weight(qdata, scale, shift, "int4", out, inp, torch.float32)
    return deq.sub_(residual)


def _refit_target(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int,
                  scale_dtype: torch.dtype, rounding: str, target: torch.Tensor) -> float:
    """Fill `target` with W − dequant(int4(W − U·V)) and return ‖W − dequant(int4(W − U·V)) − U·V‖.

    Done a slice of rows at a time (int4 groups never cross rows, so each slice quantizes exactly as
    the whole would): host memory holds `target` and one slice's temporaries, not W, U·V, the
    residual and its dequantization at full size each (1.6 GB for a 16384×6144 layer).
    """
    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
    square, down = 0.0, down.float()
    for i in range(0, weight.shape[0], rows):
        w = weight[i:i + rows].to(torch.float32, copy=True)  # a copy: it is overwritten below
        residual = w - up[i:i + rows].float() @ down
        error = _int4_error(residual, group, scale_dtype, rounding)  # dequant(Q) − (W − L)
        square += float(error.square().sum())
        target[i:i + rows] = w.sub_(residual).sub_(error)  # L − error = W − dequant(Q)
        del w, residual, error
    return square ** 0.5


def split_low_rank(weight: torch.Tensor, rank: int, group: int, scale_dtype: torch.dtype,
                   iterations: int = ITERATIONS, rounding: str = DEFAULT_ROUNDING) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r), down (r, in)) in BRANCH_DTYPE for `weight`, refined against int4 `rounding`."""
    weight = weight.detach()
    # the first fit is of W itself, later ones of W − dequant(Q), in this one buffer (a copy: the
    # caller's weight is never written)
    target = weight.to(torch.float32, copy=True)
    best, best_error = None, None
    for _ in range(iterations + 1):
        up, down = (t.to(BRANCH_DTYPE) for t in top_directions(target, rank))
        size = _refit_target(weight, up, down, group, scale_dtype, rounding, target)
        if best_error is None or size < best_error:
            best, best_error = (up, down), size
    return best


class LowRankQuantizedLinear(QuantizedLinear):
    """An int4 QuantizedLinear storing W − U·V, plus the bf16 branch U·V (child `lowrank`).

    forward() is the int4 matmul alone; calling the module adds the branch through the LoRA hook
    (`adapters.enable_resident`), like a LoRA that is part of the weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int, rank: int,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None, rounding: str = DEFAULT_ROUNDING):
        super().__init__(in_features, out_features, bias, "int4", group, compute_dtype, device, rounding=rounding)
        check_rank_fits(rank, {"this layer": (out_features, in_features)})
        self.rank = rank
        self.lowrank = LowRankBranch(rank, in_features, out_features, compute_dtype, device)
        adapters.enable_resident(self)

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Find the branch for `weight` (out, in), then quantize W − U·V into the int4 buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}")
        up, down = split_low_rank(weight, self.rank, self.group, self.scale.dtype, rounding=self.rounding)
        residual = weight.detach().to(torch.float32, copy=True)
        residual.addmm_(up.float(), down.float(), alpha=-1)  # W − U·V in place: no second full-size temporary
        super().set_weight(residual, bias)
        del residual
        # bf16-exact values, held in the activation dtype (the loader does the same with the file's)
        self.lowrank.up = up.to(self.scale.dtype)
        self.lowrank.down = down.to(self.scale.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the layer applies: dequant(Q) + U·V."""
        low = self.lowrank.up.float() @ self.lowrank.down.float()
        return (super().dequantize(torch.float32) + low).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lowrank={self.rank}"


def add_lowrank_branches(model: nn.Module, names: list[str], rank: int) -> None:
    """Replace the named (empty, meta) int4 QuantizedLinear layers by LowRankQuantizedLinear ones.
    Refuses a rank larger than any of them, naming the layer and the allowed range."""
    layers = {name: model.get_submodule(name) for name in names}
    check_rank_fits(rank, {name: (m.out_features, m.in_features) for name, m in layers.items()})
    for name, old in layers.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LowRankQuantizedLinear(old.in_features, old.out_features, old.bias is not None,
                                                    old.group, rank, old.scale.dtype, device="meta",
                                                    rounding=old.rounding))
