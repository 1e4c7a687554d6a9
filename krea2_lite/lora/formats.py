"""Read a LoRA safetensors file of any common layout into {official module: LoraPair}.

Key spellings are in `names.py`. The multiplier of each pair is alpha / rank, alpha from (first
found): a per-module `.alpha` tensor (kohya); diffusers' `lora_adapter_metadata` JSON in the file
header (`lora_alpha`, `alpha_pattern`, optionally behind `transformer.`); PEFT's
`adapter_config.json` beside an `adapter_model.safetensors`; krea-2 training metadata
(`lora_alpha`, times `lora_scale`); otherwise alpha = rank (multiplier 1: krea-2's ComfyUI files
fold the multiplier into lora_B). Every pair is checked against the model before anything is
applied: an error names the file, the key and what was expected.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from ..files.paths import resolve_path
from ..files.safetensors_headers import open_safetensors, read_safetensors_header
from ..files.weight_files import PICKLE_SUFFIXES
from ..errors import JsonFileError, LoraError, UnsafeCheckpointFormatError
from ..files.patterns import PatternError, compile_pattern, matches_module
from ..files.jsonfile import parse_json, read_json
from .names import ModuleIndex, split_key, unsupported_kind, why_unknown


class LoraPair(NamedTuple):
    """One layer's low-rank update: delta W = alpha/rank · up @ down, in the file's dtype."""

    down: torch.Tensor  # A, (rank, in_features)
    up: torch.Tensor    # B, (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def multiplier(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The (out, in) weight update in float32."""
        return self.multiplier * (self.up.float() @ self.down.float())


def locate_lora_file(path: str | os.PathLike) -> Path:
    """A .safetensors file as given, the single one inside a folder, or a hub id's single file."""
    text = os.fspath(path)
    if Path(text).suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointFormatError(
            f"{text}: '{Path(text).suffix}' LoRA files are pickle-based and are never opened by krea2_lite "
            "(unpickling can run arbitrary code). Convert the LoRA to .safetensors first.")
    location = resolve_path(text, ["*.safetensors", "*.json"])
    if location.is_dir():
        files = sorted(location.glob("*.safetensors"))
        if len(files) != 1:
            raise LoraError(f"{location}: a LoRA folder must hold exactly one .safetensors file, found "
                            f"{[f.name for f in files] or 'none'}; pass the file itself")
        location = files[0]
    return location


def _number(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LoraError(f"{where} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise LoraError(f"{where} must be finite, got {value!r}")
    return number


class AlphaSource:
    """alpha for a module when its file has no `.alpha` tensor (see the module docstring)."""

    def __init__(self, file: Path, metadata: dict[str, str]):
        self.file = file
        self.alpha: float | None = None
        self.patterns: dict[str, tuple[list, float]] = {}
        self.factor = 1.0
        config = None
        if "lora_adapter_metadata" in metadata:  # diffusers' save_lora_weights
            try:
                config = parse_json(metadata["lora_adapter_metadata"], where=f"{file}: header field "
                                    "lora_adapter_metadata", what="adapter config")
            except JsonFileError as exc:
                raise LoraError(str(exc)) from None
            config = {k.removeprefix("transformer."): v for k, v in config.items()}
        elif file.name == "adapter_model.safetensors" and (file.parent / "adapter_config.json").is_file():
            try:  # PEFT save_pretrained
                config = read_json(file.parent / "adapter_config.json", what="PEFT adapter config")
            except JsonFileError as exc:
                raise LoraError(str(exc)) from None
        where = f"{file}: lora_alpha"
        if config:
            if config.get("lora_alpha") is not None:
                self.alpha = _number(config["lora_alpha"], where)
            self.patterns = _patterns(config, "alpha_pattern", file)
            _patterns(config, "rank_pattern", file)  # ranks come from the tensors; the patterns are still checked
        elif "lora_alpha" in metadata:  # krea-2 training checkpoints
            self.alpha = _number(metadata["lora_alpha"], where)
            self.factor = _number(metadata.get("lora_scale", 1.0), f"{file}: lora_scale")

    def for_module(self, raw: str, rank: int) -> float:
        """alpha for a module spelled `raw` in the file (PEFT patterns match that spelling)."""
        for compiled, alpha in self.patterns.values():
            if matches_module(compiled, raw):
                return alpha * self.factor
        return (rank if self.alpha is None else self.alpha) * self.factor


def _patterns(config: dict, key: str, file: Path) -> dict[str, tuple[list, float]]:
    """{pattern: (compiled, value)} of a PEFT `alpha_pattern` / `rank_pattern`, every pattern checked
    by the backtracking-free matcher (files/patterns.py); LoraError names the file, key and pattern."""
    table = config.get(key) or {}
    if not isinstance(table, dict):
        raise LoraError(f"{file}: {key} must be an object {{pattern: number}}, found {type(table).__name__}")
    out = {}
    for pattern, value in table.items():
        try:
            out[pattern] = (compile_pattern(pattern), _number(value, f"{file}: {key}[{pattern!r}]"))
        except PatternError as exc:
            raise LoraError(f"{file}: {key}[{pattern[:80]!r}] is not a supported pattern ({exc}); see "
                            "docs/errors.md for the pattern subset krea2_lite matches") from None
    return out


def read_lora(path: str | os.PathLike, linear_shapes: dict[str, tuple[int, int]], layers: int
              ) -> tuple[Path, dict[str, LoraPair]]:
    """Parse and check a LoRA file against a model's linear layers.

    linear_shapes: {official module name: (out_features, in_features)} of the model's linear
    layers (quantized or not); layers: its block count (for error messages).
    Returns (the file read, {official module name: LoraPair}); tensors stay on the CPU in the
    file's dtype. Raises LoraError / UnsafeCheckpointFormatError / CorruptCheckpointError.
    """
    file = locate_lora_file(path)
    header = read_safetensors_header(file)  # clear errors for empty / truncated / non-safetensors files
    if not header:
        raise LoraError(f"{file}: the file holds no tensors")
    index = ModuleIndex(list(linear_shapes))
    parts: dict[str, dict[str, tuple[str, str]]] = {}  # module → role → (key, raw)
    for key in header:
        kind = unsupported_kind(key)
        if kind is not None:
            raise LoraError(f"{file}: key {key} belongs to a {kind} adapter; krea2_lite applies plain "
                            "LoRA pairs (lora_A/lora_B or lora_down/lora_up) only")
        split = split_key(key)
        if split is None:
            raise LoraError(f"{file}: key {key} is not a LoRA tensor (expected a name ending in .lora_A.weight, "
                            ".lora_B.weight, .lora_down.weight, .lora_up.weight or .alpha)")
        raw, role = split
        module = index.resolve(raw)
        if module is None:
            raise LoraError(f"{file}: key {key}: {why_unknown(key, raw, layers)}")
        slot = parts.setdefault(module, {})
        if role in slot:
            raise LoraError(f"{file}: keys {slot[role][0]} and {key} both give the {role} tensor of "
                            f"module {module}")
        slot[role] = (key, raw)

    pairs = {}
    with open_safetensors(file) as handle:
        alphas = AlphaSource(file, dict(handle.metadata() or {}))
        for module in linear_shapes:  # in model order
            if module in parts:
                pairs[module] = _pair(file, handle, module, parts[module], linear_shapes[module], alphas)
    return file, pairs


def _pair(file: Path, handle, module: str, slot: dict[str, tuple[str, str]], shape: tuple[int, int],
          alphas: AlphaSource) -> LoraPair:
    for role, other in (("down", "up"), ("up", "down")):
        if role in slot and other not in slot:
            name = "lora_B / lora_up" if other == "up" else "lora_A / lora_down"
            raise LoraError(f"{file}: key {slot[role][0]} has no matching {name} tensor for module {module}")
    if "down" not in slot:
        raise LoraError(f"{file}: key {slot['alpha'][0]} is an alpha without lora_A / lora_B tensors")
    down_key, up_key = slot["down"][0], slot["up"][0]
    down, up = handle.get_tensor(down_key), handle.get_tensor(up_key)
    for key, tensor in ((down_key, down), (up_key, up)):
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise LoraError(f"{file}: key {key} must be a 2-D float matrix, got {tuple(tensor.shape)} "
                            f"{tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise LoraError(f"{file}: key {key} contains NaN or inf")
    out_features, in_features = shape
    if down.shape[0] != up.shape[1]:
        raise LoraError(f"{file}: rank mismatch for module {module}: lora_A {down_key} is (r={down.shape[0]}, "
                        f"in={down.shape[1]}) but lora_B {up_key} is (out={up.shape[0]}, r={up.shape[1]})")
    if down.shape[0] == 0:  # alpha / rank would divide by zero
        raise LoraError(f"{file}: module {module} has rank 0 ({down_key} is {tuple(down.shape)}); a LoRA needs rank ≥ 1")
    if down.shape[1] != in_features or up.shape[0] != out_features:
        raise LoraError(f"{file}: shape mismatch for module {module}: the LoRA maps in={down.shape[1]} → "
                        f"out={up.shape[0]} ({down_key}, {up_key}) but the layer is in={in_features} → "
                        f"out={out_features}; a LoRA for another model size?")
    if "alpha" in slot:
        alpha_tensor = handle.get_tensor(slot["alpha"][0])
        if alpha_tensor.numel() != 1:
            raise LoraError(f"{file}: key {slot['alpha'][0]} must hold one number, got shape "
                            f"{tuple(alpha_tensor.shape)}")
        alpha = _number(alpha_tensor.item(), f"{file}: key {slot['alpha'][0]}")
    else:
        alpha = alphas.for_module(slot["down"][1], down.shape[0])
    return LoraPair(down, up, alpha)

