"""The checkpoint folder `--resume` reads: LoRA parameters, AdamW state, step, RNG state, data order.

All safetensors and JSON (never pickle):
  state.json            step, epoch and position in the epoch's batch order, the settings that must
                        match to resume (rank, alpha, targets, seed, batch, grad_accum, lr, data keys)
  lora.safetensors      the branch parameters by their module names
  optimizer.safetensors AdamW's exp_avg / exp_avg_sq / step per parameter, in parameter order
  rng.safetensors       the run's torch.Generator state
The folder is written beside itself under a temporary name and renamed into place: a crash while
saving leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import ArgumentError
from ..files.small_tensor_file import read_small_file
from .cache import save_atomic

MATCHING = ("rank", "lora_alpha", "targets", "seed", "batch", "grad_accum", "lr", "data_keys")


def _optimizer_tensors(optimizer: torch.optim.Optimizer, params: list) -> dict:
    state = {}
    for i, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            state[f"{i}.{name}"] = value.detach().cpu().reshape(-1) if name == "step" else value.detach().cpu()
    return state


def save_checkpoint(folder: Path, *, lora, optimizer, params: list, generator: torch.Generator,
                    progress: dict, identity: dict) -> None:
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_atomic({k: v.detach().cpu() for k, v in lora.state_dict().items()}, tmp / "lora.safetensors")
    save_atomic(_optimizer_tensors(optimizer, params) or {"empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
    save_atomic({"state": generator.get_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({**progress, "identity": identity}, indent=1, sort_keys=True))
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, *, lora, optimizer, params: list, generator: torch.Generator,
                    identity: dict) -> dict:
    """Restores everything in place; returns the progress dict (step, epoch, position)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArgumentError(f"--resume {folder}: not a training checkpoint ({exc})") from None
    saved = state.pop("identity", {})
    for key in MATCHING:
        if saved.get(key) != identity.get(key):
            raise ArgumentError(f"--resume {folder}: it was trained with {key}={saved.get(key)!r}, this run has "
                                f"{identity.get(key)!r}; resume with the same settings")
    saved_params = read_small_file(folder / "lora.safetensors")
    with torch.no_grad():  # copied into the existing parameters (the optimizer holds them)
        for name, param in lora.named_parameters():
            if name not in saved_params or saved_params[name].shape != param.shape:
                raise ArgumentError(f"--resume {folder}: lora.safetensors has no {name} of shape {tuple(param.shape)}")
            param.copy_(saved_params[name])
    tensors = read_small_file(folder / "optimizer.safetensors")
    for i, p in enumerate(params):
        entry = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        if entry:
            entry["step"] = entry["step"].reshape(())
            optimizer.state[p] = {k: v.to(p.device) for k, v in entry.items()}
    generator.set_state(read_small_file(folder / "rng.safetensors")["state"])
    return state
