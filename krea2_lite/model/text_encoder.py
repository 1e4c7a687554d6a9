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
the highest tap are never built.

Loading (``krea2_lite.loading.load_text_encoder``) builds this module on the meta device and streams
in only those tensors; the decoder linears can be held quantized (int8 / fp8 / int4, see
``krea2_lite.quantize.text_encoder``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel, Qwen3VLTextRotaryEmbedding


__all__ = [
    "DEFAULT_SELECT_LAYERS",
    "PROMPT_TEMPLATE_PREFIX",
    "PROMPT_TEMPLATE_SUFFIX",
    "DEFAULT_PREFIX_TOKENS",
    "DEFAULT_SUFFIX_TOKENS",
    "Krea2TextEncoder",
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


def validate_select_layers(select_layers: Sequence[int], num_hidden_layers: int) -> tuple[int, ...]:
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
        self.select_layers = validate_select_layers(select_layers, text_config.num_hidden_layers)
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
        self.quant_spec = None  # a QuantSpec once quantize/ has swapped its linears
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

