"""Trainable LoRA branches beside frozen (quantized or float) linears, and their file.

Each target linear gets A (rank, in) and B (out, rank) as float32 `nn.Parameter`s and one forward
hook adding (alpha/rank)·B(A·x) to its output — PEFT's arithmetic, so diffusers computes the same
thing from the file. The hook is training's own rather than `lora.adapters`' inference hook: that
one writes into the output in place (`addmm_`) and re-creates tensors on device moves, neither of
which autograd and an optimizer holding the parameters allow. The base layer is never changed:
a `QuantizedLinear` runs through its dequantized weight (`train.quantized_backward`).

Init as PEFT: A kaiming-uniform (a=√5) from the run's generator, B zeros (the untrained LoRA is
the identity). The file: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` and
`lora_adapter_metadata` = {"transformer.r", "transformer.lora_alpha", "transformer.target_modules"}
— what `Krea2Pipeline.load_lora_weights` reads (diffusers' `save_lora_weights` layout).
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ArgumentError
from ..lora.names import official_to_diffusers
from .cache import save_atomic
from .settings import TARGET_GROUPS

HOOK_ATTRIBUTE = "_krea2_lite_train_lora"


def target_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Official names of the linears the targets select, in module order."""
    leaves = {leaf for group in targets for leaf in TARGET_GROUPS[group]}
    names = []
    for name, module in model.named_modules():
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        in_block = name.startswith("blocks.") and name.split(".", 2)[2] in leaves
        in_fusion = "textfusion" in targets and name.startswith("txtfusion.")
        if in_block or in_fusion:
            names.append(name)
    if not names:
        raise ArgumentError(f"targets {','.join(targets)} select no linear layer of this model")
    return names


def _hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    lora = module.__dict__[HOOK_ATTRIBUTE]
    x = args[0].to(lora.down.dtype)
    return output + (F.linear(F.linear(x, lora.down) * lora.factor, lora.up)).to(output.dtype)


class LoraBranch(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        down = torch.empty(rank, in_features)
        bound = math.sqrt(6.0 / ((1 + 5.0) * in_features))  # kaiming_uniform_(a=√5), PEFT's init of A
        down.uniform_(-bound, bound, generator=generator)
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.factor = alpha / rank


class TrainableLora(nn.Module):
    """The branches (a ModuleDict keyed by official name with '.' → '/') and their hooks."""

    def __init__(self, model: nn.Module, names: list[str], rank: int, alpha: float, seed: int):
        super().__init__()
        layers = dict(model.named_modules())
        generator = torch.Generator().manual_seed(seed)
        self.rank, self.alpha, self.names = rank, alpha, list(names)
        self.branches = nn.ModuleDict()
        for name in names:
            layer = layers[name]
            if rank > min(layer.in_features, layer.out_features):
                raise ArgumentError(f"rank {rank} exceeds layer {name} ({layer.out_features}×{layer.in_features}); "
                                    f"use rank ≤ {min(layer.in_features, layer.out_features)}")
            self.branches[name.replace(".", "/")] = LoraBranch(layer.in_features, layer.out_features, rank, alpha,
                                                               generator)
        self._layers = [layers[n] for n in names]
        self._handles = []

    def attach(self, device: torch.device | str) -> None:
        self.to(device)
        for name, layer in zip(self.names, self._layers):
            layer.__dict__[HOOK_ATTRIBUTE] = self.branches[name.replace(".", "/")]
            self._handles.append(layer.register_forward_hook(_hook))

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._layers:
            layer.__dict__.pop(HOOK_ATTRIBUTE, None)

    def diffusers_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for name in self.names:
            branch = self.branches[name.replace(".", "/")]
            key = "transformer." + official_to_diffusers(name)
            state[key + ".lora_A.weight"] = branch.down.detach().float().cpu().clone()
            state[key + ".lora_B.weight"] = branch.up.detach().float().cpu().clone()
        return state

    def adapter_metadata(self) -> dict:
        modules = sorted({official_to_diffusers(n) for n in self.names})
        return {"transformer.r": self.rank, "transformer.lora_alpha": self.alpha,
                "transformer.target_modules": modules}

    def save(self, path, extra: dict | None = None) -> None:
        """The LoRA file, atomically (temporary name in the same folder, then rename)."""
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(self.adapter_metadata(), indent=2,
                                                                          sort_keys=True)}
        for key, value in (extra or {}).items():
            metadata[f"krea2_lite.{key}"] = str(value)
        save_atomic(self.diffusers_state(), path, metadata)
