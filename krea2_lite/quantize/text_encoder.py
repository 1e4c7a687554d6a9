"""int8 / fp8 / int4 weights for the Qwen3-VL text path, and a self-contained saved folder.

Quantized: every nn.Linear inside the built decoder layers (q/k/v/o projections, MLP gate/up/down),
which is ~90% of the 4B text path's parameters. Kept in the model dtype: the embedding table (a
lookup, not a matmul: it costs memory but no compute, and each token's row feeds every tap
unmodified) and the RMSNorm scales (a few thousand numbers). Module names are relative to the
language model (``layers.3.mlp.down_proj``).

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

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..files.jsonfile import read_json
from ..errors import CorruptCheckpointError
from ..model.text_encoder import Krea2TextEncoder
from .qlinear import QUANTO_QTYPE_NAMES, QuantizedLinear, quantize_weight_tensors, swap_linears
from .recipe import DEFAULT_INCLUDE, QuantSpec, select_linears
from ..files.shard_writer import ShardedWriter
from .w8a8_modules import attach_workspace

__all__ = ["TEXT_INCLUDE", "quantize_text_encoder_", "save_text_encoder", "text_encoder_spec"]

logger = logging.getLogger("krea2_lite")

# Every linear of the decoder layers (fnmatch's * crosses dots).
TEXT_INCLUDE = ("layers.*",)
WEIGHTS_PREFIX = "model.language_model."  # Qwen3VLForConditionalGeneration's layout
QUANTO_MAP_FILE = "quantization_map.json"
# The quantization spec and module names of a saved folder, which the loader rebuilds the modules from.
QUANT_INFO_FILE = "krea2_lite_text_encoder.json"
FORMAT_VERSION = 1


def text_encoder_spec(quant: str | QuantSpec | None) -> QuantSpec | None:
    """``quant`` as a spec for the text path.

    ``QuantSpec("int8")`` carries the transformer's default include patterns (``blocks.*``, ...), which
    match nothing here; that default is re-targeted at the decoder layers. Explicit patterns are kept
    and matched against names relative to the language model.
    """
    spec = QuantSpec.parse(quant)
    if spec is not None and spec.include == DEFAULT_INCLUDE:
        spec = dataclasses.replace(spec, include=TEXT_INCLUDE)
    if spec is not None and spec.activations is not None:  # W8A8 is a transformer recipe
        logger.info("krea2_lite: the text encoder keeps weight-only %s (W8A8 applies to the transformer)",
                    spec.dtype)
        spec = dataclasses.replace(spec, activations=None, rotate=0)
    return spec


def quantize_into_(module: QuantizedLinear, weight: torch.Tensor) -> None:
    """Quantize a float (out, in) ``weight`` into ``module``'s buffers (the bias is loaded separately)."""
    qdata, scale, shift = quantize_weight_tensors(weight, module.dtype, module.group, module.scale.dtype,
                                                  rounding=module.rounding)
    module.qdata, module.scale = qdata, scale
    if shift is not None:
        module.shift = shift


def quanto_weight_keys(module: QuantizedLinear) -> dict[str, str]:
    """``{quanto key suffix: buffer}`` for the weight of ``module`` (quanto's unused activation scales
    and the bias, which keeps its ordinary name, left out)."""
    keys = {}
    for key in module.quanto_state(""):
        buffer = QuantizedLinear.buffer_for_quanto_key(key)
        if buffer is not None and buffer != "bias":
            keys[key] = buffer
    return keys


def quantize_text_encoder_(encoder: Krea2TextEncoder, spec: str | QuantSpec) -> list[str]:
    """Quantize ``encoder``'s decoder linears in place; returns their names (``layers.0.self_attn.q_proj``).

    Each nn.Linear is replaced by a :class:`QuantizedLinear` quantized from its current weights, computing
    in the encoder's dtype. The embedding table and the norms stay in the model dtype. An int4 layer whose
    in_features is longer than the group and not a multiple of it stays float (``select_linears`` logs
    which and why). Gives the same modules, bit for bit, as ``load_text_encoder(..., quant=spec)`` at the
    same dtype.
    """
    spec = text_encoder_spec(spec)
    if spec is None:
        raise ValueError("spec must be 'int8', 'fp8', 'int4' or a QuantSpec")
    if encoder.quant_spec is not None:
        raise ValueError(f"this text encoder is already quantized ({encoder.quant_spec.dtype})")
    names, _ = select_linears(encoder.text_model, spec)
    model, compute_dtype = encoder.text_model, encoder.dtype
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        linear = getattr(owner, leaf)
        setattr(owner, leaf, QuantizedLinear.from_linear(linear, spec.dtype, spec.group_for(linear.in_features),
                                                         compute_dtype, rounding=spec.rounding))
    attach_workspace(model, names)
    encoder.quant_spec, encoder.quantized_modules = spec, names
    return names


# ---------------------------------------------------------------------- saving
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


# ---------------------------------------------------------------------- loading (used by krea2_lite.loading.text_encoder)
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


def swap_for_loading(encoder: Krea2TextEncoder, spec: QuantSpec, saved_modules: list[str] | None,
                     compute_dtype: torch.dtype, where: str = "saved text encoder") -> dict[str, QuantizedLinear]:
    """Swap the modules to quantize for empty meta QuantizedLinear ones; ``{name: module}``.

    With ``saved_modules`` (a quantized folder) exactly those are swapped, less the ones in layers this
    encoder does not build; otherwise the spec chooses, as in :func:`quantize_text_encoder_`. ``where``
    names the file the saved names came from, for the messages.
    """
    model = encoder.text_model
    if saved_modules is None:
        names, _ = select_linears(model, spec)
    else:
        built = {name for name, _ in model.named_modules()}
        names = [name for name in saved_modules if name in built]
        not_linear = [name for name in names if not isinstance(model.get_submodule(name), nn.Linear)]
        if not_linear:
            raise CorruptCheckpointError(f"{where}: quantized modules that are not linear layers here: {not_linear[:4]}")
    swap_linears(model, names, spec.dtype, spec.group_for, compute_dtype, rounding=spec.rounding)
    encoder.quant_spec, encoder.quantized_modules = spec, names
    return {name: model.get_submodule(name) for name in names}
