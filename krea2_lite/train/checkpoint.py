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

from ..errors import ArgumentError, JsonFileError, NonFiniteError
from ..files.jsonfile import get_typed, read_json
from ..files.leftovers import partial_name
from ..files.no_replace import exchange
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
    tmp = folder.with_name(partial_name(folder.name))  # a killed run's: removed by the next (run_paths)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_atomic({k: v.detach().cpu() for k, v in lora.state_dict().items()}, tmp / "lora.safetensors")
    save_atomic(_optimizer_tensors(optimizer, params) or {"empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
    save_atomic({"state": generator.get_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({**progress, "identity": identity}, indent=1, sort_keys=True))
    if folder.is_dir() and exchange(tmp, folder):  # atomic: the folder is always the old or the new one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = folder.with_name(partial_name(folder.name, middle=".old"))
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _read_state(folder: Path) -> dict:
    """state.json through the guarded JSON reader: step / epoch / position integers ≥ 0, identity an object."""
    path = folder / "state.json"
    if not path.is_file():
        raise ArgumentError(f"--resume {folder}: not a training checkpoint (no state.json)")
    state = read_json(path, required=("step", "epoch", "position", "identity"), what="training checkpoint state")
    for key in ("step", "epoch", "position"):
        value = get_typed(state, key, int, where=str(path))
        if value is None or value < 0:
            raise JsonFileError(f"{path}: '{key}' must be an integer ≥ 0, found {value!r}")
    get_typed(state, "identity", dict, where=str(path), default={})
    return state


def _restore_optimizer(folder: Path, optimizer, params: list) -> None:
    """AdamW's state per parameter: exp_avg and exp_avg_sq of the parameter's shape, and step."""
    tensors = read_small_file(folder / "optimizer.safetensors")
    for i, p in enumerate(params):
        entry = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        if not entry:
            continue
        bad = [k for k in ("exp_avg", "exp_avg_sq") if k not in entry or entry[k].shape != p.shape]
        if bad or "step" not in entry or entry["step"].numel() != 1:
            raise ArgumentError(f"--resume {folder}: optimizer.safetensors lacks a valid "
                                f"{(bad or ['step'])[0]} for parameter {i}; not a checkpoint of this run")
        entry["step"] = entry["step"].reshape(())
        optimizer.state[p] = {k: v.to(p.device) for k, v in entry.items()}


def load_checkpoint(folder: Path, *, lora, optimizer, params: list, generator: torch.Generator,
                    identity: dict) -> dict:
    """Restores everything in place; returns the progress dict (step, epoch, position)."""
    folder = Path(folder)
    state = _read_state(folder)
    saved = state.pop("identity") or {}
    for key in MATCHING:
        if saved.get(key) != identity.get(key):
            raise ArgumentError(f"--resume {folder}: it was trained with {key}={saved.get(key)!r}, this run has "
                                f"{identity.get(key)!r}; resume with the same settings")
    saved_params = read_small_file(folder / "lora.safetensors")
    with torch.no_grad():  # copied into the existing parameters (the optimizer holds them)
        for name, param in lora.named_parameters():
            if name not in saved_params or saved_params[name].shape != param.shape:
                raise ArgumentError(f"--resume {folder}: lora.safetensors has no {name} of shape {tuple(param.shape)}")
            if not torch.isfinite(saved_params[name]).all():
                raise NonFiniteError(f"--resume {folder}: lora.safetensors holds NaN/inf in {name}; resume from an "
                                     "earlier checkpoint")
            param.copy_(saved_params[name])
    _restore_optimizer(folder, optimizer, params)
    rng = read_small_file(folder / "rng.safetensors").get("state")
    try:
        generator.set_state(rng)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"--resume {folder}: rng.safetensors holds no valid generator 'state'") from None
    return state
