"""LoRA branches beside linear layers: y = W·x + Σᵢ sᵢ·Bᵢ(Aᵢ·x), W never rewritten.

Each adapted layer gets one forward hook and a `LayerLoras` record kept in the module's
`__dict__` (not a submodule, parameter or buffer), so `state_dict()`, `named_buffers()` and the
quantized tensors stay exactly what they were. Works the same for `QuantizedLinear` and
`nn.Linear`: the hook only sees the layer's input and output.

Precision: A and B are stored in the activation dtype (`Krea2Transformer.compute_dtype`) and the
branch runs in it, like PEFT: bf16 models compute (x·Aᵀ)·s in bf16, then ·Bᵀ. s = scale·alpha/rank
is applied to the rank-r intermediate, the smallest tensor of the three. B·h is added into the
layer's output by one GEMM with beta=1 (`addmm_`, the BLAS epilogue), so no output-sized
temporary is made; A·x is not fused into the quantized matmul kernel (the hook stays
independent of the kernels).

Resident branches: a layer may carry its own low-rank branch as a child module `lowrank` with
buffers `down` (rank, in) and `up` (out, rank) — int4-lr's correction of its quantization error
(`quantize/lowrank.py`). It runs through this same hook with factor 1, part of the layer's
weights: no LoRA verb touches it. When it and LoRAs are present they run as ONE branch: the
down-projections are stacked (cached until a branch changes) so the layer makes one (tokens, Σr)
GEMM and one rank-Σr update instead of one pair per branch.

Merging (dense `nn.Linear` only): W ← W₀ + Σ merged sᵢ·BᵢAᵢ, summed in float32 from W₀ (A and B
kept in float32) and cast once, so scale changes never accumulate rounding. W₀ is kept on the
CPU while any LoRA is merged into the layer and copied back on unload: exact, at the cost of one
host copy of every merged layer's weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from .formats import LoraPair

ATTRIBUTE = "_krea2_lora"
RESIDENT = "lowrank"  # child module name of a layer's own low-rank branch (int4-lr)


@dataclass
class Branch:
    down: torch.Tensor  # A (rank, in), activation dtype, the layer's device
    up: torch.Tensor    # B (out, rank)
    multiplier: float   # alpha / rank, from the file
    scale: float        # the user's scale
    merged: bool = False

    @property
    def factor(self) -> float:
        return self.multiplier * self.scale

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes


@dataclass
class LayerLoras:
    branches: dict[str, Branch] = field(default_factory=dict)
    hook: RemovableHandle | None = None
    original: torch.Tensor | None = None  # W₀ on the CPU while a merged LoRA is in the weight


def layer_device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.buffers()), None)
    if tensor is None:
        tensor = next(iter(module.parameters()))
    return tensor.device


def is_dense(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def layer_loras(module: nn.Module) -> LayerLoras | None:
    return module.__dict__.get(ATTRIBUTE)


def resident_pair(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(down, up) of the layer's own low-rank branch (int4-lr), or None."""
    branch = module._modules.get(RESIDENT)
    return None if branch is None else (branch.down, branch.up)


def _terms(module: nn.Module, layer: LayerLoras, device: torch.device) -> list[tuple]:
    """[(down, up, factor)] of every branch to run now: the resident one first, then the LoRAs."""
    terms = []
    resident = resident_pair(module)
    if resident is not None:
        terms.append((*resident, 1.0))
    for branch in layer.branches.values():
        if branch.merged or branch.factor == 0:  # scale 0 gives exactly the base output
            continue
        if branch.down.device != device:  # the layer was moved after loading: follow it once
            branch.down, branch.up = branch.down.to(device), branch.up.to(device)
        terms.append((branch.down, branch.up, branch.factor))
    return terms


def _fuse(terms: list[tuple]) -> tuple:
    """One (down, up, factor) for several branches of one dtype: downs stacked over the rank axis,
    ups side by side, the factor per rank row. Stacked per call, not cached: a cached copy would
    hold every branch twice on the device, and the copies cost ~Σr/tokens of the GEMMs."""
    if len(terms) == 1:
        return terms[0]
    down = torch.cat([d for d, _, _ in terms])
    up = torch.cat([u for _, u, _ in terms], dim=1)
    if all(f == 1 for _, _, f in terms):
        return down, up, 1.0
    factors = torch.cat([torch.full((d.shape[0],), f, dtype=d.dtype, device=d.device) for d, _, f in terms])
    return down, up, factors


def _lora_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    terms = _terms(module, module.__dict__[ATTRIBUTE], args[0].device)
    if not terms:
        return output
    x = args[0].reshape(-1, args[0].shape[-1])
    out = output.reshape(-1, output.shape[-1])  # a view of the output when it is contiguous
    groups: dict[torch.dtype, list[tuple]] = {}
    for term in terms:  # a resident branch and LoRAs normally share the activation dtype: one group
        groups.setdefault(term[0].dtype, []).append(term)
    for dtype, group in groups.items():
        down, up, factor = _fuse(group)
        hidden = F.linear(x.to(dtype), down)  # (tokens, Σ rank)
        if isinstance(factor, torch.Tensor) or factor != 1:
            hidden = hidden * factor
        if out.requires_grad or out.dtype != hidden.dtype:
            out = out + F.linear(hidden, up).to(out.dtype)
        else:
            # B·h and the add as one GEMM with beta=1 (the BLAS epilogue): no output-sized
            # temporary, one rounding to the output dtype.
            out.addmm_(hidden, up.t())
    return out.view(output.shape)


def enable_resident(module: nn.Module) -> None:
    """Run `module`'s own `lowrank` branch (see the module docstring) through the branch hook."""
    layer = layer_loras(module)
    if layer is None:
        layer = LayerLoras()
        module.__dict__[ATTRIBUTE] = layer
    if layer.hook is None:
        layer.hook = module.register_forward_hook(_lora_hook)


def attach(module: nn.Module, name: str, pair: LoraPair, scale: float, dtype: torch.dtype,
           merge: bool = False, device: torch.device | None = None) -> None:
    """Add LoRA `name` to a linear layer: A and B cast to `dtype`, on `device` (None: where the
    layer's tensors are now). A merged LoRA keeps A and B in float32 beside its weight."""
    layer = layer_loras(module)
    if layer is None:
        layer = LayerLoras()
        module.__dict__[ATTRIBUTE] = layer
    device = layer_device(module) if device is None or merge else torch.device(device)
    if merge:  # only read when (re)merging, which sums in float32: keep the file's precision
        dtype = torch.float32
    # Cast where the file was read, then move: the device only ever holds the final tensors.
    branch = Branch(pair.down.to(dtype).to(device), pair.up.to(dtype).to(device), pair.multiplier,
                    float(scale), merged=merge)
    layer.branches[name] = branch
    if merge:
        _remerge(module, layer)
    elif layer.hook is None:
        layer.hook = module.register_forward_hook(_lora_hook)


def set_scale(module: nn.Module, name: str, scale: float) -> None:
    layer = layer_loras(module)
    branch = layer.branches[name]
    branch.scale = float(scale)
    if branch.merged:
        _remerge(module, layer)


def detach(module: nn.Module, name: str) -> None:
    """Remove LoRA `name`; the layer computes exactly as before it was added."""
    layer = layer_loras(module)
    branch = layer.branches.pop(name)
    if branch.merged:
        _remerge(module, layer)
    resident = resident_pair(module) is not None  # the layer's own branch keeps the hook and record
    if not resident and not any(not b.merged for b in layer.branches.values()) and layer.hook is not None:
        layer.hook.remove()
        layer.hook = None
    if not layer.branches and not resident:
        del module.__dict__[ATTRIBUTE]


@torch.no_grad()
def _remerge(module: nn.Module, layer: LayerLoras) -> None:
    """weight ← W₀ + Σ merged factor·B·A (float32 sum, one cast); W₀ itself when none is merged."""
    merged = [b for b in layer.branches.values() if b.merged]
    weight = module.weight
    if not merged:
        if layer.original is not None:
            weight.copy_(layer.original)  # the exact bits kept at the first merge
            layer.original = None
        return
    if layer.original is None:
        layer.original = weight.detach().to("cpu", copy=True)
    total = layer.original.to(device=weight.device, dtype=torch.float32, copy=True)  # never alias W₀
    for branch in merged:
        total.addmm_(branch.up.float(), branch.down.float(), alpha=branch.factor)
    weight.copy_(total)  # in place: the parameter (and state_dict tensor) stays the same object
