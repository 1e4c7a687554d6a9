"""`load_transformer`: any supported checkpoint, or a krea2_lite quantized folder, through one
routine: build on the meta device → swap in quantized modules → stream the tensors into place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path

import torch

from ..config import Krea2Config
from ..errors import ArgumentError, CheckpointKeysError, CorruptCheckpointError, ShapeMismatchError
from ..files.checkpoint import CheckpointSource, open_checkpoint
from ..files.dtypes import check_float_dtype
from ..files.paths import resolve_path
from ..files.quantized_folder import MANIFEST, TRANSFORMER_DIR, TRANSFORMER_NAME, is_quantized_folder, read_manifest
from ..files.weight_files import find_weight_files, tensor_locations
from ..model import Krea2Transformer
from ..quantize.qlinear import QuantizedLinear
from ..quantize.recipe import QuantSpec
from ..quantize.skeleton import build_quantized_skeleton
from .comfy import comfy_fill, comfy_format
from .fill import FloatSetter, QuantizingSetter, StoredSetter, cast_meta_, fill_groups, placement, unloaded
from .gguf import gguf_fill, gguf_stored_format
from .transformer_config import check_diffusers_config, check_keys_and_shapes, infer_config

logger = logging.getLogger("krea2_lite")

TRANSFORMER_PATTERNS = ["*.json", "*.safetensors", "transformer/*"]


def open_float_checkpoint(location: Path, config: Krea2Config | None = None) -> tuple[CheckpointSource, Krea2Config]:
    """The checkpoint's tensors (headers only) and its config, inferred unless given; both checked."""
    source = open_checkpoint(location)
    diffusers_config = source.diffusers_config or {}
    explicit = config is not None
    if config is None:
        theta = float(diffusers_config.get("rope_theta", Krea2Config.theta))
        config = infer_config(source.shapes(), theta=theta, where=str(source.location))
    check_diffusers_config(diffusers_config, config, source.location)
    check_keys_and_shapes(source, config, explicit)
    return source, config


def manifest_spec(folder: Path, manifest: dict) -> QuantSpec:
    """The manifest's `quant` recipe; a missing or invalid one (a hand-edited dtype, rounding, rank)
    is a CorruptCheckpointError naming the manifest."""
    try:
        return QuantSpec.from_dict(manifest["quant"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{folder / MANIFEST}: invalid 'quant' recipe ({exc})") from None


def manifest_config(folder: Path, manifest: dict) -> Krea2Config:
    """The manifest's model `config`; a missing or invalid one is a CorruptCheckpointError naming the manifest."""
    try:
        return Krea2Config.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{folder / MANIFEST}: invalid 'config' ({type(exc).__name__}: {exc})") from None


def manifest_modules(folder: Path, manifest: dict) -> list[str]:
    """The quantized module names the manifest lists (`quant.modules`), checked to be names."""
    modules = manifest.get("quant", {}).get("modules") if isinstance(manifest.get("quant"), dict) else None
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise CorruptCheckpointError(f"{folder / MANIFEST}: 'quant.modules' must be a list of module names, "
                                     f"got {modules!r:.80}")
    return modules


def describe_transformer(path, quant) -> tuple[Krea2Config, QuantSpec | None]:
    """(Krea2Config, QuantSpec or None) of a transformer checkpoint, from its headers / manifest only."""
    location = resolve_path(path, TRANSFORMER_PATTERNS, parts=("transformer",))
    if is_quantized_folder(location):
        manifest = read_manifest(location)
        return manifest_config(location, manifest), manifest_spec(location, manifest)
    source = open_checkpoint(location)
    theta = float((source.diffusers_config or {}).get("rope_theta", Krea2Config.theta))
    config = infer_config(source.shapes(), theta=theta, where=str(source.location))
    if source.gguf is not None and quant is None:  # kept as stored: the planner counts the stored bytes
        return config, gguf_stored_format(source, config)
    if source.comfy is not None and quant is None:
        return config, comfy_format(source)
    return config, QuantSpec.parse(quant)


def transformer_skeleton(config: Krea2Config, spec: QuantSpec | None, dtype: torch.dtype,
                         modules: list[str] | None = None, log: bool = True) -> Krea2Transformer:
    """A meta-device transformer whose float tensors have their loaded dtypes and whose selected
    linears are empty QuantizedLinear modules (`modules` overrides the spec's choice)."""
    if spec is None:
        with torch.device("meta"):
            model = Krea2Transformer(config)
    else:
        model = build_quantized_skeleton(config, spec, dtype, modules=modules, log=log)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    return cast_meta_(model, dtype, skip=quantized)


def quantized_modules(model: torch.nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def load_transformer(path: str | os.PathLike, *, config: Krea2Config | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     quant=None, progress: bool | None = None,
                     device_blocks: Collection[int] | None = None) -> Krea2Transformer:
    """Load a Krea 2 transformer from any supported layout (see `krea2_lite.files.checkpoint`).

    The model is built on the meta device and each tensor is streamed from its file straight
    into place, a block at a time, cast on its own: norm scales and modulation tables stay float32,
    the rest becomes `dtype`. On the CPU a tensor already in `dtype` stays memory-mapped
    (copy-on-write: the file is never modified), so host memory stays near one copy of the
    weights. `config=None` infers the shape from the tensors. Returns the model in eval mode
    with gradients off.

    `quant` ("int8" | "fp8" | "int4" | "int8-w8a8[-rot]" | "fp8-w8a8[-rot]" | QuantSpec) quantizes
    while streaming: the float model is never whole in memory. A krea2_lite quantized folder (one
    file or shards) loads as it was written. `device_blocks` (block indices), when given, are the
    blocks placed on `device`; the others go to host memory, where a memory plan streams them from.
    """
    spec = QuantSpec.parse(quant)
    check_float_dtype(dtype)  # int8 etc. are asked for with quant=, never dtype=
    device = torch.device(device)
    place = placement(device, device_blocks)
    location = resolve_path(path, TRANSFORMER_PATTERNS, parts=("transformer",))
    if is_quantized_folder(location):
        stored = manifest_spec(location, read_manifest(location)).name
        if spec is not None and spec.name != stored:
            raise ValueError(f"{location} is already quantized to {stored}; quant={spec.name!r} cannot apply "
                             "(quantize the float checkpoint instead, or pass quant=None)")
        return load_quantized_folder(location, place=place, dtype=dtype, progress=progress)
    source, config = open_float_checkpoint(location, config)
    community = source.gguf is not None or source.comfy is not None
    model = transformer_skeleton(config, spec, dtype) if spec is not None or not community else None
    put = FloatSetter(dtype) if spec is None else QuantizingSetter(dtype, quantized_modules(model))
    model, put, entries, reader = community_fill(source, config, dtype, model, put)
    desc = "loading transformer" if spec is None else f"quantizing to {spec.name}"
    for _ in fill_groups(model, entries, put, place=place, mmap=spec is None, progress=progress, desc=desc,
                         reader=reader):
        pass
    _check_complete(model, source.location)
    logger.info("loaded %s layout from %s: %d blocks, %.2fB parameters", source.layout, source.location,
                config.layers, config.num_parameters() / 1e9)
    return model.eval()


def community_fill(source: CheckpointSource, config: Krea2Config, dtype: torch.dtype, model, put):
    """(model, put, entries, reader) for `fill_groups`: unchanged for a float checkpoint; for a GGUF
    or ComfyUI quantized file either its stored skeleton (`model` None) or `model` / `put` fed with
    dequantized tensors (quantizing it: `load_transformer(quant=...)`, the quantize CLI)."""
    if source.gguf is not None:
        model, put, reader = gguf_fill(source, config, dtype, model, put)
        return model, put, source.entries, reader
    if source.comfy is not None:
        model, put, entries = comfy_fill(source, config, dtype, model, put)
        return model, put, entries, None
    return model, put, source.entries, None


def _check_complete(model: torch.nn.Module, where) -> None:
    left = unloaded(model)
    if left:  # every tensor was checked against the model above; this guards the load plan itself
        raise RuntimeError(f"{where}: tensors left unloaded: {left[:5]}")


def stored_targets(model: torch.nn.Module) -> tuple[dict[str, str], set[str]]:
    """{on-disk key: model tensor name} of a quantized skeleton, and the names stored exactly
    (quantized values: int8 / fp8 / packed int4 codes, never cast)."""
    targets, exact = {}, set()
    quantized = quantized_modules(model)
    for name, module in quantized.items():
        for key in module.quanto_state(name + "."):
            leaf = QuantizedLinear.buffer_for_quanto_key(key[len(name) + 1:])
            if leaf is not None:
                targets[key] = f"{name}.{leaf}"
                if leaf == "qdata":
                    exact.add(f"{name}.{leaf}")
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name.rpartition(".")[0] not in quantized:
            targets[name] = name
    return targets, exact


def load_quantized_folder(folder: Path, *, place, dtype: torch.dtype, progress: bool | None = None) -> torch.nn.Module:
    """Rebuild the quantized transformer of a folder written by `python -m krea2_lite.quantize`
    (a single `model.safetensors`, or shards with their index)."""
    manifest = read_manifest(folder)
    config, spec = manifest_config(folder, manifest), manifest_spec(folder, manifest)
    try:
        model = transformer_skeleton(config, spec, dtype, modules=manifest_modules(folder, manifest), log=False)
    except ArgumentError as exc:  # quant.modules naming a non-linear module, or none
        raise CorruptCheckpointError(f"{folder / MANIFEST}: {exc}") from None
    weights_dir = folder / TRANSFORMER_DIR
    if not weights_dir.is_dir():
        raise CorruptCheckpointError(f"{weights_dir}: missing (the folder is incomplete)")
    found = tensor_locations(find_weight_files(weights_dir, preferred=TRANSFORMER_NAME, what="transformer"))
    targets, exact = stored_targets(model)
    ignorable = {k for k in found if k.endswith((".input_scale", ".output_scale"))}
    missing = sorted(set(targets) - set(found))
    unexpected = sorted(set(found) - set(targets) - ignorable)
    if missing or unexpected:
        raise CheckpointKeysError(f"{weights_dir}: the tensors disagree with {folder / MANIFEST}: "
                                  f"{len(missing)} missing (first: {missing[:3]}), "
                                  f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
    entries = {key: (file, key, info) for key, (file, info) in found.items() if key in targets}
    for key, (file, _, info) in entries.items():
        expected = tuple(_meta_tensor(model, targets[key]).shape)
        if tuple(info.shape) != expected:
            raise ShapeMismatchError(f"{file}: '{key}' has shape {tuple(info.shape)}, the manifest's "
                                     f"config expects {expected}")
    put = StoredSetter(dtype, targets, exact)
    for _ in fill_groups(model, entries, put, place=place, mmap=True, progress=progress,
                           desc="loading quantized transformer"):
        pass
    _check_complete(model, folder)
    return model.eval()


def _meta_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent)
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
