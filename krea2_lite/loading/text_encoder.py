"""`load_text_encoder`: the Krea 2 text path of a Qwen3-VL checkpoint (float, quantized while it
streams, or a saved quantized folder), through the same fill routine as the transformer.

Only the tensors the taps need are read (see `krea2_lite.model.text_encoder`); the vision tower,
the LM head and the layers past the highest tap never are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig, Qwen3VLTextConfig

from ..errors import (CheckpointKeysError, CheckpointNotFoundError, CorruptCheckpointError,
                      NotKrea2CheckpointError, ShapeMismatchError)
from ..model.text_encoder import (DEFAULT_PREFIX_TOKENS, DEFAULT_SELECT_LAYERS, DEFAULT_SUFFIX_TOKENS,
                                  PROMPT_TEMPLATE_PREFIX, PROMPT_TEMPLATE_SUFFIX, Krea2TextEncoder,
                                  validate_select_layers)
from ..quantize.recipe import QuantSpec
from ..files.dtypes import check_float_dtype
from ..files.jsonfile import read_json
from ..files.safetensors_headers import TensorInfo, require_float
from ..files.weight_files import find_weight_files, refuse_pickle, tensor_locations
from .fill import fill_groups, set_tensor, unloaded
from .text_encoder_folder import QUANT_INFO_FILE, resolve_load_spec

_ACCEPTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_text")
# Where the language model sits in the checkpoints we read, most specific first:
#   Qwen3VLForConditionalGeneration (hub)  model.language_model.*   (+ model.visual.*, lm_head.*)
#   Qwen3VLModel (diffusers text_encoder/) language_model.*         (+ visual.*)
#   Qwen3VLTextModel, bare or wrapped      model.* / *
_LM_PREFIXES = ("model.language_model.", "language_model.", "model.", "")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def read_text_config(folder: Path) -> tuple[Qwen3VLTextConfig, dict]:
    """(text config, raw config.json dict)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{folder}: no config.json (expected a Qwen3-VL text encoder folder)")
    raw = read_json(config_file, what="text encoder config")
    model_type = raw.get("model_type")
    if model_type not in _ACCEPTED_MODEL_TYPES:
        raise NotKrea2CheckpointError(
            f"{config_file}: model_type {model_type!r} (architectures {raw.get('architectures')}) is not a Qwen3-VL "
            f"text encoder; Krea 2 uses Qwen3-VL-4B-Instruct (model_type one of {_ACCEPTED_MODEL_TYPES})")
    if model_type == "qwen3_vl" and not isinstance(raw.get("text_config"), dict):
        raise NotKrea2CheckpointError(f"{config_file}: qwen3_vl config without a text_config")
    try:
        if model_type == "qwen3_vl":
            return Qwen3VLConfig.from_dict(raw).text_config, raw
        return Qwen3VLTextConfig.from_dict(raw), raw
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # transformers does not name the file
        raise CorruptCheckpointError(f"{config_file}: not a valid Qwen3-VL config ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from None


def resolve_folders(path: Path, tokenizer_path: str | Path | None = None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for a text_encoder/ folder, a pipeline root or a hub folder."""
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        refuse_pickle(path)
        path = path.parent  # a config.json or .safetensors inside the model folder
    if not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
        path = path / "text_encoder"  # a diffusers pipeline root
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_dir():
            raise CheckpointNotFoundError(f"{tokenizer_path}: tokenizer folder not found")
        return path, Path(tokenizer_path)
    candidates = [path.parent / "tokenizer", path] if path.name == "text_encoder" else [path, path.parent / "tokenizer"]
    for folder in candidates:
        if folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return path, folder
    return path, None


class TextEncoderSetter:
    """Puts the text encoder's tensors: "copy" (floats cast to dtype; stored quantized values kept
    exactly, their scales in the module's dtype) or "quantize" (a float weight quantized as read)."""

    def __init__(self, encoder: Krea2TextEncoder, how: dict[str, str], dtype: torch.dtype, where: dict[str, str]):
        self.encoder, self.how, self.dtype, self.where = encoder, how, dtype, where

    def __call__(self, model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device) -> None:
        from ..quantize.text_encoder import quantize_into_

        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path)
        if self.how[name] == "quantize":
            return quantize_into_(module, tensor.to(device=device, dtype=self.dtype))
        target = getattr(module, attr)
        if attr == "qdata":  # stored integers / fp8 codes: the type is the format, never cast
            if tensor.dtype != target.dtype:
                raise CorruptCheckpointError(f"{self.where[name]} is {tensor.dtype}, "
                                             f"{self.encoder.quant_spec.dtype} stores {target.dtype}")
            return set_tensor(model, name, tensor.to(device))
        if isinstance(target, nn.Parameter):
            return set_tensor(model, name, tensor.to(device=device, dtype=self.dtype if tensor.is_floating_point() else None))
        set_tensor(model, name, tensor.to(device=device, dtype=target.dtype))  # a scale / shift

    def finish_group(self, group: str) -> None:
        pass


def plan_reads(encoder: Krea2TextEncoder, needed: dict[str, str], quantized: dict, saved: bool) -> tuple[dict, dict]:
    """({model name: checkpoint key}, {model name: "copy" | "quantize"}) for every tensor to read."""
    from ..quantize.text_encoder import quanto_weight_keys

    keys, how = {}, {}
    for name, ckpt in needed.items():
        module_path, _, attr = name.rpartition(".")
        if module_path not in quantized or attr != "weight":
            keys[name], how[name] = ckpt, "copy"
        elif not saved:
            keys[name], how[name] = ckpt, "quantize"
        else:  # already quantized on disk: read quanto's tensors instead of the float weight
            base = ckpt[: -len("weight")]
            for suffix, buffer in quanto_weight_keys(quantized[module_path]).items():
                keys[f"{module_path}.{buffer}"], how[f"{module_path}.{buffer}"] = base + suffix, "copy"
    return keys, how


def _check_shapes(model: nn.Module, entries: dict, how: dict) -> None:
    for name, (file, key, info) in entries.items():
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path)
        quantize = how[name] == "quantize"
        expected = (module.out_features, module.in_features) if quantize else tuple(getattr(module, attr).shape)
        if tuple(info.shape) != expected:
            raise ShapeMismatchError(f"{file}: {key} has shape {tuple(info.shape)}, config.json implies {expected}")


def _locate(model_folder: Path) -> tuple[dict[str, tuple[Path, TensorInfo]], str]:
    """{key: (file, info)} of the folder's weights and the language model's key prefix."""
    found = tensor_locations(find_weight_files(model_folder, preferred="model.safetensors", what="weights"))
    prefix = next((p for p in _LM_PREFIXES if f"{p}embed_tokens.weight" in found), None)
    if prefix is None:
        raise CheckpointKeysError(f"{model_folder}: no language-model embedding found (looked for "
                                  f"{', '.join(p + 'embed_tokens.weight' for p in _LM_PREFIXES)})")
    return found, prefix


def _attach_tokenizer(encoder: Krea2TextEncoder, tokenizer_folder: Path, prefix_tokens, suffix_tokens) -> None:
    encoder.tokenizer = load_tokenizer(tokenizer_folder)
    counted = {"prefix_tokens": len(encoder.tokenizer(PROMPT_TEMPLATE_PREFIX).input_ids),
               "suffix_tokens": len(encoder.tokenizer(PROMPT_TEMPLATE_SUFFIX).input_ids)}
    for name, given in (("prefix_tokens", prefix_tokens), ("suffix_tokens", suffix_tokens)):
        if given is None:
            setattr(encoder, name, counted[name])
        elif given != counted[name]:
            warnings.warn(
                f"{tokenizer_folder}: the tokenizer makes {counted[name]} tokens of the template "
                f"{'prefix' if name == 'prefix_tokens' else 'suffix'}, but {name}={given} (the Krea 2 "
                f"reference constant); keeping {given}. Pass {name}=None to use the tokenizer's count.",
                UserWarning, stacklevel=4)  # the caller of load_text_encoder


def load_tokenizer(folder: Path):
    """AutoTokenizer for `folder`, its JSON files validated first (transformers reports a damaged
    tokenizer.json without naming the file, or as an unrelated AttributeError)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json",
                 "added_tokens.json"):
        if (folder / name).exists():
            read_json(folder / name, what=f"tokenizer file {name}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many unrelated types for one damaged folder
        raise CorruptCheckpointError(f"{folder}: the tokenizer cannot be loaded ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from None


def load_text_encoder(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    select_layers: Sequence[int] = DEFAULT_SELECT_LAYERS,
    prefix_tokens: int | None = DEFAULT_PREFIX_TOKENS,
    suffix_tokens: int | None = DEFAULT_SUFFIX_TOKENS,
    tokenizer_path: str | Path | None = None,
    quant: str | QuantSpec | None = None,
) -> Krea2TextEncoder:
    """Load the Krea 2 text encoder from a local folder, reading only the tensors the taps need.

    ``path`` is a diffusers pipeline ``text_encoder/`` folder (a saved ``Qwen3VLModel``; its tokenizer
    is the sibling ``tokenizer/``), a pipeline root holding both, a Qwen3-VL hub folder (a
    ``Qwen3VLForConditionalGeneration`` checkpoint with its tokenizer files alongside), or a folder
    written by ``krea2_lite.loading.text_encoder_folder.save_text_encoder``. Sharded checkpoints
    (``model.safetensors.index.json``) are supported; pickle weights are refused.

    ``prefix_tokens`` / ``suffix_tokens`` default to the reference constants 34 / 5; pass ``None`` to
    take them from what the tokenizer makes of the template (an explicit value the tokenizer disagrees
    with is warned about and kept, as the reference would).

    ``quant`` (``"int8"``, ``"fp8"``, ``"int4"`` or a ``QuantSpec``) holds the decoder linears quantized:
    each float weight is read, cast to ``dtype``, quantized on ``device`` and dropped before the next
    one is read, so the float model never exists whole. The embedding table and the norms stay in
    ``dtype``. A saved quantized folder loads as it was saved; a different ``quant`` is refused
    (re-quantizing quantized weights would compound the error).
    """
    device = torch.device(device)
    encoder, entries, put = prepare_text_encoder(Path(path), device=device, dtype=dtype, select_layers=select_layers,
                                                 prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens,
                                                 tokenizer_path=tokenizer_path, quant=quant)
    for _ in fill_groups(encoder.text_model, entries, put, place=lambda group: device, mmap=True,
                           progress=False, desc="loading text encoder"):
        pass
    left = unloaded(encoder)
    if left:  # every tensor was planned; this guards the plan itself
        raise RuntimeError(f"text encoder tensors left unloaded: {left[:5]}")
    return encoder


def prepare_text_encoder(path: Path, *, device: torch.device, dtype: torch.dtype, select_layers=DEFAULT_SELECT_LAYERS,
                         prefix_tokens=DEFAULT_PREFIX_TOKENS, suffix_tokens=DEFAULT_SUFFIX_TOKENS,
                         tokenizer_path=None, quant=None) -> tuple[Krea2TextEncoder, dict, TextEncoderSetter]:
    """A meta-built encoder (quantized modules swapped in, tokenizer attached), the tensors to stream
    into its text model {name: (file, key, info)}, and how to put them: `fill_groups`' arguments."""
    from ..quantize.text_encoder import swap_for_loading

    check_float_dtype(dtype)
    model_folder, tokenizer_folder = resolve_folders(path, tokenizer_path)
    text_config, raw_config = read_text_config(model_folder)
    select_layers = validate_select_layers(select_layers, text_config.num_hidden_layers)
    found, prefix = _locate(model_folder)
    if tokenizer_folder is None:
        raise CheckpointNotFoundError(
            f"{model_folder}: no tokenizer found (looked for {', '.join(_TOKENIZER_FILES)} in the folder and in "
            "a sibling tokenizer/); pass tokenizer_path=")
    spec, saved_modules = None, None
    if quant is not None or (model_folder / QUANT_INFO_FILE).is_file():
        spec, saved_modules = resolve_load_spec(model_folder, quant)
    with torch.device("meta"):
        encoder = Krea2TextEncoder(text_config, select_layers=select_layers, device=device,
                                   prefix_tokens=DEFAULT_PREFIX_TOKENS if prefix_tokens is None else prefix_tokens,
                                   suffix_tokens=DEFAULT_SUFFIX_TOKENS if suffix_tokens is None else suffix_tokens)
    encoder.source_config = raw_config
    needed = {name: prefix + name for name in encoder.state_dict_keys()}  # float names, before any swap
    quantized = (swap_for_loading(encoder, spec, saved_modules, dtype, where=str(model_folder / QUANT_INFO_FILE))
                 if spec is not None else {})
    keys, how = plan_reads(encoder, needed, quantized, saved_modules is not None)
    missing = sorted(key for key in keys.values() if key not in found)
    if missing:
        raise CheckpointKeysError(
            f"{model_folder}: {len(missing)} tensor(s) needed by the text encoder are missing, e.g. {missing[:5]}")
    entries = {name: (found[key][0], key, found[key][1]) for name, key in keys.items()}
    # Floats wherever a float is read (stored quanto codes are the exception).
    require_float(found, [key for name, key in keys.items() if how[name] == "quantize" or not name.endswith(".qdata")])
    _check_shapes(encoder.text_model, entries, how)
    _attach_tokenizer(encoder, tokenizer_folder, prefix_tokens, suffix_tokens)
    return encoder, entries, TextEncoderSetter(encoder, how, dtype, {n: f"{f}: {k}" for n, (f, k, _) in entries.items()})
