"""The saved text-encoder folder: written from a (quantized or float) encoder, and its
quantization info read back for loading.

A saved folder (:func:`save_text_encoder`) holds:

* ``config.json``: the Qwen3-VL config the encoder was loaded from, untouched, so
  :func:`krea2_lite.loading.load_text_encoder` reads it like any other;
* ``model.safetensors``: only the tensors the encoder uses, under ``model.language_model.*`` (the hub
  layout); quantized linears under optimum-quanto's keys (``...q_proj.weight._data``, ``weight._scale``,
  ...), float ones under their usual names;
* ``quantization_map.json``: optimum-quanto's ``{module: {"weights": qtype, "activations": "none"}}``;
* ``krea2_lite_text_encoder.json``: the ``QuantSpec`` and the quantized module names, which the loader
  uses to rebuild the same modules (quanto's map alone does not carry the int4 group size);
* the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CorruptCheckpointError
from ..files.jsonfile import read_json
from ..files.shard_writer import ShardedWriter
from ..model.text_encoder import Krea2TextEncoder
from ..quantize.qlinear import QUANTO_QTYPE_NAMES, QuantizedLinear
from ..quantize.recipe import QuantSpec
from ..quantize.text_encoder import text_encoder_spec

__all__ = ["QUANT_INFO_FILE", "resolve_load_spec", "save_text_encoder"]

WEIGHTS_PREFIX = "model.language_model."  # Qwen3VLForConditionalGeneration's layout
QUANTO_MAP_FILE = "quantization_map.json"
# The quantization spec and module names of a saved folder, which the loader rebuilds the modules from.
QUANT_INFO_FILE = "krea2_lite_text_encoder.json"
FORMAT_VERSION = 1


def _config_dict(encoder: Krea2TextEncoder) -> dict:
    if encoder.source_config is not None:
        return encoder.source_config
    # Built directly, not loaded: the text config alone is a config the loader accepts.
    return {**encoder.full_text_config.to_dict(), "model_type": "qwen3_vl_text"}


def text_state(model: nn.Module, group: str | None = None) -> dict[str, torch.Tensor]:
    """The saved tensors of the text model (or of one of its groups: ``embed_tokens``, ``layers.3``, ...)
    under their hub names: quantized linears in optimum-quanto's keys, the rest by parameter name."""
    root = model if group is None else model.get_submodule(group)
    state: dict[str, torch.Tensor] = {}
    for name, module in root.named_modules(prefix=group or ""):
        prefix = f"{WEIGHTS_PREFIX}{name}." if name else WEIGHTS_PREFIX
        if isinstance(module, QuantizedLinear):
            state.update(module.quanto_state(prefix))
        else:  # parameters only: the rotary frequencies are computed at build time, never stored
            state.update({prefix + p: t.detach() for p, t in module.named_parameters(recurse=False)})
    return state


def save_text_encoder(encoder: Krea2TextEncoder, folder: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write ``encoder`` (quantized or not) as a self-contained folder that ``load_text_encoder`` reads.

    Only the tensors the encoder uses are written (no vision tower, LM head, unused layers, nor the final
    norm unless it is tapped), in the encoder's dtype: one ``model.safetensors``, or shards of at most
    ``max_shard_bytes`` with a ``model.safetensors.index.json``. Writing atomically (a temporary folder,
    then a rename) is the caller's job. (``python -m krea2_lite.quantize`` writes the same folder while
    the encoder streams in, never holding it whole: ``krea2_lite.loading.quantized_writer``.)
    """
    modules = check_saveable(encoder)
    folder = Path(folder)
    state = text_state(encoder.text_model)
    layout = [(key, t.dtype, tuple(t.shape)) for key, t in state.items()]
    writer = ShardedWriter(folder, "model", layout, max_shard_bytes or sum(t.nbytes for t in state.values()) + 1)
    try:
        for key, tensor in state.items():
            writer.write(key, tensor)
        writer.close()
    finally:
        writer.abort()
    write_text_encoder_files(encoder, folder, modules)


def check_saveable(encoder: Krea2TextEncoder) -> list[str]:
    """The quantized module names of an encoder that can be saved (it has a tokenizer and a spec)."""
    if encoder.tokenizer is None:
        raise ValueError("this text encoder has no tokenizer; a saved folder must hold one to be loadable")
    modules = [name for name, m in encoder.text_model.named_modules() if isinstance(m, QuantizedLinear)]
    if modules and encoder.quant_spec is None:
        raise ValueError("QuantizedLinear modules without a quant_spec: quantize with quantize_text_encoder_")
    return modules


def write_text_encoder_files(encoder: Krea2TextEncoder, folder: Path, modules: list[str]) -> None:
    """Everything of a saved folder but the weights: config, quantization info, quanto map, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_config_dict(encoder), indent=2) + "\n", encoding="utf-8")
    spec = encoder.quant_spec
    info = {"format": FORMAT_VERSION, "weights_prefix": WEIGHTS_PREFIX,
            "quantization": spec.to_dict() if spec is not None else None, "modules": modules,
            "select_layers": list(encoder.select_layers), "dtype": str(encoder.dtype).removeprefix("torch.")}
    (folder / QUANT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if modules:
        qtype = QUANTO_QTYPE_NAMES[spec.dtype]
        quanto_map = {WEIGHTS_PREFIX + name: {"weights": qtype, "activations": "none"} for name in modules}
        (folder / QUANTO_MAP_FILE).write_text(json.dumps(quanto_map, indent=2) + "\n", encoding="utf-8")
    encoder.tokenizer.save_pretrained(str(folder))


def resolve_load_spec(folder: Path, quant: str | QuantSpec | None) -> tuple[QuantSpec | None, list[str] | None]:
    """(spec, saved module names) for loading ``folder``: saved names when its weights are already
    quantized, None when ``quant`` is to be applied while streaming float weights."""
    requested = text_encoder_spec(quant)
    info_file = folder / QUANT_INFO_FILE
    if not info_file.is_file():
        return requested, None
    try:
        info = read_json(info_file, what="text encoder quantization info")
        saved = QuantSpec.from_dict(info["quantization"]) if info.get("quantization") else None
        modules = [str(name) for name in info.get("modules", [])]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{info_file}: unreadable quantization info ({exc})") from exc
    if saved is None:
        return requested, None  # a float folder written by save_text_encoder
    if requested is not None and requested != saved:
        raise ValueError(
            f"{folder} is already quantized ({saved}); load it with quant=None (or the same spec): "
            "re-quantizing quantized weights would compound the error"
        )
    return saved, modules
