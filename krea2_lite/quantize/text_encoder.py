"""int8 / fp8 / int4 weights for the Qwen3-VL text path.

Quantized: every nn.Linear inside the built decoder layers (q/k/v/o projections, MLP gate/up/down),
which is ~90% of the 4B text path's parameters. Kept in the model dtype: the embedding table (a
lookup, not a matmul: it costs memory but no compute, and each token's row feeds every tap
unmodified) and the RMSNorm scales (a few thousand numbers). Module names are relative to the
language model (``layers.3.mlp.down_proj``).

Saving and reading a quantized folder of the text encoder is `krea2_lite.loading.text_encoder_folder`.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..errors import CorruptCheckpointError
from ..model.text_encoder import Krea2TextEncoder
from .qlinear import QuantizedLinear, quantize_weight_tensors, swap_linears
from .recipe import DEFAULT_INCLUDE, QuantSpec, select_linears
from .w8a8_modules import attach_workspace

__all__ = ["TEXT_INCLUDE", "quantize_text_encoder_", "text_encoder_spec"]

logger = logging.getLogger("krea2_lite")

# Every linear of the decoder layers (fnmatch's * crosses dots).
TEXT_INCLUDE = ("layers.*",)


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
