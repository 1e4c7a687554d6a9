"""The on-disk quantized folder: a manifest, the transformer in optimum-quanto's layout, and
(when made from a whole pipeline) the other components.

  DIR/krea2_lite.json                  manifest: format version, source, config, recipe, variant
  DIR/transformer/model.safetensors    float tensors under official names; quantized linears
                                       under optimum-quanto's keys (`….weight._data`, `._scale`)
  DIR/transformer/quantization_map.json   optimum-quanto's map {module: {"weights": qtype}}
  DIR/text_encoder/, DIR/vae/, DIR/scheduler/   present when the source was a pipeline
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import keeps_fp32, read_safetensors_header
from ..config import Krea2Config
from ..jsonfile import read_json
from ..errors import CheckpointKeysError, CorruptCheckpointError, Krea2LiteError, ShapeMismatchError
from .qlinear import QUANTO_QTYPE_NAMES, QuantizedLinear
from .recipe import QuantSpec
from .stream import build_quantized_skeleton

FORMAT = "krea2_lite.quantized"
# Version 2 (W8A8 with a Hadamard rotation: `quant.rotate` > 0, weights stored as W·H) is written only
# for rotated folders, which an older reader would run without the rotation; everything else is
# still written as version 1, and both load here. `quant.activations` is absent in weight-only
# folders (older readers run a W8A8 folder as weight-only, which is correct, just not W8A8).
FORMAT_VERSION = 2
MANIFEST = "krea2_lite.json"
TRANSFORMER_FILE = "transformer/model.safetensors"
QUANTIZATION_MAP = "transformer/quantization_map.json"


class FormatVersionError(Krea2LiteError, ValueError):
    """A quantized folder written by a newer krea2_lite (or not a krea2_lite folder at all)."""


def transformer_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a (partly) quantized model under its on-disk name."""
    state = {}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, module in quantized.items():
        state.update(module.quanto_state(name + "."))
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] not in quantized:
            state[name] = tensor
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_transformer(model: torch.nn.Module, folder: Path) -> None:
    """Write DIR/transformer/ (tensors + quanto map). `folder` is the (temporary) DIR."""
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    info = model.quantization
    save_file(transformer_state(model), str(folder / TRANSFORMER_FILE), metadata={"format": "pt"})
    # quanto's "activations" would mean static calibrated scales; ours are dynamic per token, so the
    # map describes the weights only (for rotated folders: the weights W·H).
    qmap = {name: {"weights": QUANTO_QTYPE_NAMES[info.spec.dtype], "activations": "none"} for name in info.modules}
    (folder / QUANTIZATION_MAP).write_text(json.dumps(qmap, indent=1))


def required_version(manifest: dict) -> int:
    """The oldest format version that reads this manifest correctly."""
    return 2 if manifest.get("quant", {}).get("rotate") else 1


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": required_version(manifest),
                                               **manifest}, indent=1))


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    manifest = read_json(path, what="quantized-folder manifest")
    if manifest.get("format") != FORMAT:
        raise FormatVersionError(f"{path}: not a krea2_lite quantized folder (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(f"{path}: format version {version!r} is newer than this krea2_lite reads "
                                 f"({FORMAT_VERSION}); upgrade krea2_lite")
    return manifest


def load_quantized_folder(folder: Path, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Rebuild the quantized transformer of a folder written by `python -m krea2_lite.quantize`."""
    manifest = read_manifest(folder)
    config = Krea2Config.from_dict(manifest["config"])
    quant = manifest["quant"]
    spec = QuantSpec.from_dict(quant)
    model = build_quantized_skeleton(config, spec, dtype, modules=quant["modules"], log=False)
    file = folder / TRANSFORMER_FILE
    if not file.exists():
        raise CorruptCheckpointError(f"{file}: missing (the folder is incomplete)")
    header = read_safetensors_header(file)

    expected: dict[str, tuple[str, str]] = {}  # on-disk key -> (module, buffer or parameter)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            for key in module.quanto_state(name + "."):
                leaf = QuantizedLinear.buffer_for_quanto_key(key[len(name) + 1:])
                if leaf is not None:
                    expected[key] = (name, leaf)
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if owner not in quantized:
            expected[name] = (owner, leaf)
    ignorable = {k for k in header if k.endswith((".input_scale", ".output_scale"))}
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected) - ignorable)
    if missing or unexpected:
        raise CheckpointKeysError(f"{file}: the tensors disagree with {folder / MANIFEST}: "
                                  f"{len(missing)} missing (first: {missing[:3]}), "
                                  f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
    load_device = str(device) if device.type == "cuda" else "cpu"
    with safe_open(str(file), framework="pt", device=load_device) as handle:
        for key, (owner_name, leaf) in expected.items():
            owner = model.get_submodule(owner_name)
            tensor = handle.get_tensor(key)
            current = owner._parameters.get(leaf, owner._buffers.get(leaf))
            if current is not None and tuple(current.shape) != tuple(tensor.shape):
                raise ShapeMismatchError(f"{file}: '{key}' has shape {tuple(tensor.shape)}, the manifest's "
                                         f"config expects {tuple(current.shape)}")
            stored_exact = isinstance(owner, QuantizedLinear) and leaf == "qdata"  # fp8 values stay fp8
            if tensor.is_floating_point() and not stored_exact:
                tensor = tensor.to(torch.float32 if keeps_fp32(key) else dtype)
            tensor = tensor.to(device)
            if leaf in owner._parameters:
                owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
            else:
                owner._buffers[leaf] = tensor
    return model.eval()


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def is_quantized_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()
