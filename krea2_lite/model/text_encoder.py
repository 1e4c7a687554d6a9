"""Krea 2 text conditioning: the text path of Qwen3-VL-4B-Instruct, truncated at the last tapped layer.

Krea 2 conditions its transformer on a stack of hidden states tapped from several decoder layers of
Qwen3-VL's language model (not on the last hidden state). This module reproduces
diffusers' ``Krea2Pipeline.get_text_hidden_states`` exactly, while building and reading only what
those taps need:

* the chat template is tokenized as a fixed-length block ``[prefix | prompt | PAD | suffix]``: the
  prefix + prompt is truncated / padded to ``max_sequence_length + prefix_tokens - suffix_tokens``
  and the assistant suffix is tokenized separately and appended *after* the padding;
* positions count only real tokens (``cumsum(mask) - 1``, clamped at 0), identical on the three
  mRoPE axes, so padding does not shift the suffix's rotary phase;
* ``hidden_states[i]`` for ``i`` in ``select_layers`` (0 is the embedding output, ``i`` the output of
  decoder layer ``i - 1``) are stacked on dim 2, and the first ``prefix_tokens`` positions of the
  states and of the mask are dropped.

Only ``max(select_layers)`` decoder layers are built (35 of 36 for the real model). transformers
overwrites the *last* entry of ``hidden_states`` with the final-norm output; that entry (index
``num_hidden_layers``) is therefore the only one that is normed. The default taps stop at 35 < 36,
so the final norm is never built, read or applied; a tap at ``num_hidden_layers`` is honoured by
loading the norm and applying it to that entry only, as the reference does.

The vision tower, the LM head, the final norm (unless tapped as above) and the decoder layers past
the highest tap are never read from disk. Weights are streamed tensor by tensor from safetensors;
pickle files are refused.

The decoder linears can be held quantized (int8 / fp8 / int4, see ``krea2_lite.quantize.text_encoder``):
``load_text_encoder(..., quant="int8")`` quantizes each weight as it is read, and a folder written by
``save_text_encoder`` (its ``krea2_lite_text_encoder.json`` names the spec and the modules) is loaded
back from its optimum-quanto tensors.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig, Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel, Qwen3VLTextRotaryEmbedding

from ..checkpoint import open_safetensors
from ..jsonfile import read_json
from ..safetensors_set import check_float_dtype, locate_tensors, read_weight_map, require_float
from ..errors import (CheckpointKeysError, CheckpointNotFoundError, CorruptCheckpointError,
                      NotKrea2CheckpointError, ShapeMismatchError, UnsafeCheckpointFormatError)

if TYPE_CHECKING:  # imported lazily at run time: plain float loads never import optimum-quanto
    from ..quantize.recipe import QuantSpec

__all__ = [
    "DEFAULT_SELECT_LAYERS",
    "PROMPT_TEMPLATE_PREFIX",
    "PROMPT_TEMPLATE_SUFFIX",
    "DEFAULT_PREFIX_TOKENS",
    "DEFAULT_SUFFIX_TOKENS",
    "Krea2TextEncoder",
    "load_text_encoder",
]

logger = logging.getLogger("krea2_lite")

# Indices into the encoder's hidden_states tuple (0 = embedding output) stacked as Krea 2's conditioning.
DEFAULT_SELECT_LAYERS: tuple[int, ...] = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)

PROMPT_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
PROMPT_TEMPLATE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
# What the Qwen tokenizer makes of the prefix / suffix above; the reference hard-codes both.
DEFAULT_PREFIX_TOKENS = 34
DEFAULT_SUFFIX_TOKENS = 5

_ACCEPTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_text")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Where the language model sits in the checkpoints we read, most specific first:
#   Qwen3VLForConditionalGeneration (hub)  model.language_model.*   (+ model.visual.*, lm_head.*)
#   Qwen3VLModel (diffusers text_encoder/) language_model.*         (+ visual.*)
#   Qwen3VLTextModel, bare or wrapped      model.* / *
_LM_PREFIXES = ("model.language_model.", "language_model.", "model.", "")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# Written by krea2_lite.quantize.text_encoder.save_text_encoder: the quantization spec and module names.
QUANT_INFO_FILE = "krea2_lite_text_encoder.json"


def _validate_select_layers(select_layers: Sequence[int], num_hidden_layers: int) -> tuple[int, ...]:
    layers = tuple(select_layers)
    if not layers:
        raise ValueError("select_layers must name at least one hidden-state index")
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= num_hidden_layers:
            raise ValueError(
                f"select_layers entries must be ints in [0, {num_hidden_layers}] (0 = embedding output, "
                f"{num_hidden_layers} = last layer after the final norm); got {i!r} in {layers}"
            )
    return layers


class Krea2TextEncoder(nn.Module):
    """Qwen3-VL's language model cut after the highest tapped layer, plus the Krea 2 prompt layout.

    ``text_config`` is the full model's ``Qwen3VLTextConfig`` (``num_hidden_layers`` as released);
    only ``max(select_layers)`` decoder layers are instantiated, through transformers' own
    ``Qwen3VLTextModel``. ``tokenizer`` is needed by :meth:`encode` only.

    ``prefix_tokens`` / ``suffix_tokens`` are the reference's template constants (34 / 5 for the
    Qwen tokenizer); :func:`load_text_encoder` can derive them from the tokenizer instead.
    """

    def __init__(
        self,
        text_config: Qwen3VLTextConfig,
        tokenizer=None,
        *,
        select_layers: Sequence[int] = DEFAULT_SELECT_LAYERS,
        prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
        suffix_tokens: int = DEFAULT_SUFFIX_TOKENS,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.select_layers = _validate_select_layers(select_layers, text_config.num_hidden_layers)
        for name, value in (("prefix_tokens", prefix_tokens), ("suffix_tokens", suffix_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.prefix_tokens = prefix_tokens
        self.suffix_tokens = suffix_tokens
        self.tokenizer = tokenizer
        # What save_text_encoder needs to write a self-contained folder: the config as released (the
        # raw config.json when loaded from one) and the quantization, if any (set by quantize_text_encoder_
        # or the loader).
        self.full_text_config = copy.deepcopy(text_config)
        self.source_config: dict | None = None
        self.quant_spec: QuantSpec | None = None
        self.quantized_modules: list[str] = []
        self.prompt_template_prefix = PROMPT_TEMPLATE_PREFIX
        self.prompt_template_suffix = PROMPT_TEMPLATE_SUFFIX

        self.full_num_hidden_layers = text_config.num_hidden_layers
        self.num_built_layers = max(self.select_layers)
        # transformers replaces hidden_states[num_hidden_layers] with the final-norm output; only a tap
        # at that index needs the norm.
        self.uses_final_norm = self.num_built_layers == text_config.num_hidden_layers

        config = copy.deepcopy(text_config)
        config.num_hidden_layers = self.num_built_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types)[: self.num_built_layers]
        model = Qwen3VLTextModel(config)
        if not self.uses_final_norm:
            model.norm = None
        # The rotary inverse frequencies are computed, not loaded: rebuild them for real (in fp32, as
        # transformers does) when the rest of the model was built on the meta device.
        if model.rotary_emb.inv_freq.is_meta:
            with torch.device("cpu"):
                model.rotary_emb = Qwen3VLTextRotaryEmbedding(config=config)
            if device is not None:
                model.rotary_emb.to(device)
        self.text_model = model
        self.config = config
        self.eval()
        self.requires_grad_(False)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.text_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embed_tokens.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_taps(self) -> int:
        return len(self.select_layers)

    def state_dict_keys(self) -> list[str]:
        """The parameter names this encoder needs, relative to the language model (``layers.3.mlp...``)."""
        return [name for name, _ in self.text_model.named_parameters()]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        position_ids: torch.LongTensor,
    ) -> torch.Tensor:
        """Tapped hidden states ``(B, L, len(select_layers), hidden)`` for already-built inputs.

        ``attention_mask`` is the 2-D padding mask, ``position_ids`` ``(3, B, L)`` mRoPE positions.
        Same semantics as ``Qwen3VLTextModel.forward`` with ``output_hidden_states=True``: a causal
        mask combined with the key padding mask, built by transformers' ``create_causal_mask``.
        """
        model = self.text_model
        wanted = set(self.select_layers)
        inputs_embeds = model.embed_tokens(input_ids)
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        mask = create_causal_mask(
            config=model.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None,
            position_ids=None,  # the reference passes (3, B, L) ids, which carry no text row
        )
        position_embeddings = model.rotary_emb(inputs_embeds, position_ids)

        states: dict[int, torch.Tensor] = {}
        hidden = inputs_embeds
        if 0 in wanted:
            states[0] = hidden
        for index, layer in enumerate(model.layers, start=1):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings)
            if index in wanted:
                states[index] = hidden
        if self.uses_final_norm:
            states[self.num_built_layers] = model.norm(hidden)
        return torch.stack([states[i] for i in self.select_layers], dim=2)

    # ------------------------------------------------------------------ prompts
    def tokenize(self, prompts: str | Sequence[str], max_sequence_length: int = 512) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` (bool) / ``position_ids`` (3, B, L) of the Krea 2 layout,
        before the prefix is dropped. Warns when a prompt is truncated."""
        if self.tokenizer is None:
            raise ValueError("this Krea2TextEncoder has no tokenizer; pass one or use load_text_encoder")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}")
        if not isinstance(max_sequence_length, int) or isinstance(max_sequence_length, bool) or max_sequence_length <= 0:
            raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")

        texts = [self.prompt_template_prefix + p for p in prompts]
        max_length = max_sequence_length + self.prefix_tokens - self.suffix_tokens
        if max_length <= 0:
            raise ValueError(
                f"max_sequence_length={max_sequence_length} leaves no room for the prompt "
                f"(prefix_tokens={self.prefix_tokens}, suffix_tokens={self.suffix_tokens})"
            )

        full_lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, padding=False).input_ids]
        too_long = [(i, n - max_length) for i, n in enumerate(full_lengths) if n > max_length]
        if too_long:
            detail = ", ".join(f"prompt {i}: {d} token{'s' if d != 1 else ''} dropped" for i, d in too_long)
            message = (
                f"prompt too long for max_sequence_length={max_sequence_length} "
                f"({max_length - self.prefix_tokens} prompt tokens fit); truncated ({detail})"
            )
            warnings.warn(message, UserWarning, stacklevel=3)

        text = self.tokenizer(
            texts, truncation=True, padding="max_length", max_length=max_length, return_tensors="pt"
        )
        suffix = self.tokenizer([self.prompt_template_suffix] * len(texts), return_tensors="pt")
        input_ids = torch.cat([text["input_ids"], suffix["input_ids"]], dim=1)
        attention_mask = torch.cat([text["attention_mask"], suffix["attention_mask"]], dim=1).bool()
        # Padding does not consume a position: the suffix keeps the rotary phase it had in training.
        position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def encode(
        self, prompts: str | Sequence[str], max_sequence_length: int = 512
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Krea 2 text conditioning for ``prompts``.

        Returns ``(hidden, mask)``: ``hidden`` of shape ``(B, max_sequence_length, len(select_layers),
        hidden_size)`` in the encoder's dtype, ``mask`` ``(B, max_sequence_length)`` bool (True = real
        token), laid out exactly as diffusers' ``Krea2Pipeline.get_text_hidden_states``.
        """
        batch = self.tokenize(prompts, max_sequence_length)
        device = self.device
        with torch.no_grad():  # not inference_mode: callers may edit the outputs in place
            hidden = self(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["position_ids"].to(device),
            )
        mask = batch["attention_mask"].to(device)
        return hidden[:, self.prefix_tokens:], mask[:, self.prefix_tokens:]


# ---------------------------------------------------------------------- loading
def _read_text_config(folder: Path) -> tuple[Qwen3VLTextConfig, dict]:
    """(text config, raw config.json dict)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{folder}: no config.json (expected a Qwen3-VL text encoder folder)")
    raw = read_json(config_file, what="text encoder config")
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in _ACCEPTED_MODEL_TYPES:
        arch = raw.get("architectures") if isinstance(raw, dict) else None
        raise NotKrea2CheckpointError(
            f"{config_file}: model_type {model_type!r} (architectures {arch}) is not a Qwen3-VL text encoder; "
            f"Krea 2 uses Qwen3-VL-4B-Instruct (model_type one of {_ACCEPTED_MODEL_TYPES})"
        )
    if model_type == "qwen3_vl":
        if not isinstance(raw.get("text_config"), dict):
            raise NotKrea2CheckpointError(f"{config_file}: qwen3_vl config without a text_config")
        return Qwen3VLConfig.from_dict(raw).text_config, raw
    return Qwen3VLTextConfig.from_dict(raw), raw


def _weight_files(folder: Path) -> dict[str, Path] | list[Path]:
    """``{key: file}`` from a sharded index, else the list of safetensors files in ``folder``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_weight_map(index)
        files = {key: folder / name for key, name in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointNotFoundError(f"{index} names shard files that are missing: {missing[:4]}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointFormatError(
            f"{folder}: only pickle-based weights ({', '.join(pickles[:4])}); krea2_lite never unpickles. "
            "Convert them to safetensors first."
        )
    raise CheckpointNotFoundError(f"{folder}: no *.safetensors weights")


def _load_tokenizer(folder: Path):
    """AutoTokenizer for ``folder``, its JSON files validated first (transformers reports a damaged
    tokenizer.json without naming the file, or as an unrelated AttributeError)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json",
                 "added_tokens.json"):
        if (folder / name).exists():
            read_json(folder / name, what=f"tokenizer file {name}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, Exception) as exc:
        raise CorruptCheckpointError(f"{folder}: the tokenizer cannot be loaded ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from None


def _resolve_folders(path: Path) -> tuple[Path, Path | None]:
    """(model folder, tokenizer folder or None) for a text_encoder/ folder, a pipeline root or a hub folder."""
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise UnsafeCheckpointFormatError(f"{path}: pickle-based checkpoint refused (never unpickled)")
        path = path.parent  # a config.json or .safetensors inside the model folder
    if not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
        path = path / "text_encoder"  # a diffusers pipeline root
    candidates = [path.parent / "tokenizer", path] if path.name == "text_encoder" else [path, path.parent / "tokenizer"]
    for folder in candidates:
        if folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return path, folder
    return path, None


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
    written by ``krea2_lite.quantize.text_encoder.save_text_encoder``. Sharded checkpoints
    (``model.safetensors.index.json``) are supported; pickle weights are refused.

    ``prefix_tokens`` / ``suffix_tokens`` default to the reference constants 34 / 5; pass ``None`` to
    take them from what the tokenizer makes of the template. A mismatch between an explicit value and
    the tokenizer is warned about (and the explicit value kept, as the reference would).

    ``quant`` (``"int8"``, ``"fp8"``, ``"int4"`` or a ``QuantSpec``) holds the decoder linears quantized:
    each float weight is read, cast to ``dtype``, quantized on ``device`` and dropped before the next
    one is read, so the float model never exists whole. The embedding table and the norms stay in
    ``dtype``. A saved quantized folder loads as it was saved, from its optimum-quanto tensors;
    ``quant`` may then be omitted, and a different spec is refused (re-quantizing quantized weights
    would compound the error).
    """
    check_float_dtype(dtype)
    model_folder, tokenizer_folder = _resolve_folders(Path(path))
    if tokenizer_path is not None:
        tokenizer_folder = Path(tokenizer_path)
        if not tokenizer_folder.is_dir():
            raise CheckpointNotFoundError(f"{tokenizer_folder}: tokenizer folder not found")
    text_config, raw_config = _read_text_config(model_folder)
    select_layers = _validate_select_layers(select_layers, text_config.num_hidden_layers)
    files = _weight_files(model_folder)
    if tokenizer_folder is None:
        raise CheckpointNotFoundError(
            f"{model_folder}: no tokenizer found (looked for {', '.join(_TOKENIZER_FILES)} in the folder and in "
            "a sibling tokenizer/); pass tokenizer_path="
        )
    spec, saved_modules = None, None
    if quant is not None or (model_folder / QUANT_INFO_FILE).is_file():
        from ..quantize.text_encoder import resolve_load_spec

        spec, saved_modules = resolve_load_spec(model_folder, quant)

    # Which keys exist, and in which file.
    # Headers only: duplicates across unindexed files refused, an index obeyed, byte lengths checked.
    if isinstance(files, dict):
        located = locate_tensors(sorted(set(files.values())), weight_map={k: f.name for k, f in files.items()},
                                 index=model_folder / "model.safetensors.index.json")
    else:
        located = locate_tensors(files, where=model_folder)
    key_to_file = {key: file for key, (file, _) in located.items()}
    prefix = next((p for p in _LM_PREFIXES if f"{p}embed_tokens.weight" in key_to_file), None)
    if prefix is None:
        raise CheckpointKeysError(
            f"{model_folder}: no language-model embedding found (looked for "
            f"{', '.join(p + 'embed_tokens.weight' for p in _LM_PREFIXES)})"
        )

    with torch.device("meta"):
        encoder = Krea2TextEncoder(
            text_config,
            select_layers=select_layers,
            prefix_tokens=prefix_tokens if prefix_tokens is not None else DEFAULT_PREFIX_TOKENS,
            suffix_tokens=suffix_tokens if suffix_tokens is not None else DEFAULT_SUFFIX_TOKENS,
            device=device,
        )
    encoder.source_config = raw_config
    needed = {name: prefix + name for name in encoder.state_dict_keys()}  # float names, before any swap
    quantized = {}
    if spec is not None:
        from ..quantize.text_encoder import quantize_into_, quanto_weight_keys, swap_for_loading

        quantized = swap_for_loading(encoder, spec, saved_modules, dtype)

    # (checkpoint key, module path, attribute, how): "copy" places the tensor (floats cast to dtype),
    # "quantize" quantizes a float weight into a QuantizedLinear's buffers as it is read.
    plan: list[tuple[str, str, str, str]] = []
    for name, ckpt in needed.items():
        module_path, _, attr = name.rpartition(".")
        if module_path not in quantized or attr != "weight":
            plan.append((ckpt, module_path, attr, "copy"))
        elif saved_modules is None:
            plan.append((ckpt, module_path, attr, "quantize"))
        else:  # already quantized on disk: read quanto's tensors instead of the float weight
            base = ckpt[: -len("weight")]
            plan += [(base + suffix, module_path, buffer, "copy")
                     for suffix, buffer in quanto_weight_keys(quantized[module_path]).items()]
    missing = sorted(item[0] for item in plan if item[0] not in key_to_file)
    if missing:
        raise CheckpointKeysError(
            f"{model_folder}: {len(missing)} tensor(s) needed by the text encoder are missing, e.g. {missing[:5]}"
        )
    require_float(located, [item[0] for item in plan if item[3] == "quantize" or item[2] != "qdata"])

    by_file: dict[Path, list[tuple[str, str, str, str]]] = {}
    for item in plan:
        by_file.setdefault(key_to_file[item[0]], []).append(item)
    model = encoder.text_model
    for file, items in by_file.items():
        with open_safetensors(file) as handle:
            for ckpt, module_path, attr, how in items:
                module = model.get_submodule(module_path)
                target = None if how == "quantize" else getattr(module, attr)
                expected = (module.out_features, module.in_features) if target is None else tuple(target.shape)
                found = tuple(handle.get_slice(ckpt).get_shape())
                if found != expected:
                    raise ShapeMismatchError(
                        f"{file}: {ckpt} has shape {found}, config.json implies {expected}"
                    )
                tensor = handle.get_tensor(ckpt)
                if how == "quantize":
                    quantize_into_(module, tensor.to(device=device, dtype=dtype))
                elif attr == "qdata":  # stored integers / fp8 codes: the type is the format, never cast
                    if tensor.dtype != target.dtype:
                        raise CorruptCheckpointError(
                            f"{file}: {ckpt} is {tensor.dtype}, {encoder.quant_spec.dtype} stores {target.dtype}"
                        )
                    setattr(module, attr, tensor.to(device))
                elif isinstance(target, nn.Parameter):
                    tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
                    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
                else:  # a QuantizedLinear scale / shift: in the compute dtype, like the module built it
                    setattr(module, attr, tensor.to(device=device, dtype=target.dtype))
    left = [name for name, t in (*encoder.named_parameters(), *encoder.named_buffers()) if t.is_meta]
    if left:  # every tensor above was planned; this guards the plan itself
        raise RuntimeError(f"text encoder tensors left unloaded: {left[:5]}")

    encoder.tokenizer = _load_tokenizer(tokenizer_folder)
    counted = {
        "prefix_tokens": len(encoder.tokenizer(PROMPT_TEMPLATE_PREFIX).input_ids),
        "suffix_tokens": len(encoder.tokenizer(PROMPT_TEMPLATE_SUFFIX).input_ids),
    }
    for name, given in (("prefix_tokens", prefix_tokens), ("suffix_tokens", suffix_tokens)):
        if given is None:
            setattr(encoder, name, counted[name])
        elif given != counted[name]:
            warnings.warn(
                f"{tokenizer_folder}: the tokenizer makes {counted[name]} tokens of the template "
                f"{'prefix' if name == 'prefix_tokens' else 'suffix'}, but {name}={given} (the Krea 2 "
                f"reference constant); keeping {given}. Pass {name}=None to use the tokenizer's count.",
                UserWarning,
                stacklevel=2,
            )
    return encoder
