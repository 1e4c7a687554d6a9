"""Recognise ComfyUI's quantized safetensors layouts from their keys and header (never the file name).

A bottom-layer reader (imports only `errors`). Two layouts, as ComfyUI's own loader reads them:
  legacy `scaled_fp8`  `X.weight` in float8 (e4m3fn or e5m2), `X.scale_weight` (a float32 scalar:
                       w = weight · scale_weight), maybe `X.scale_input`; a top-level `scaled_fp8`
                       marker tensor. A float weight with a `scale_weight` is multiplied by it too.
  mixed precision      `X.weight` plus `X.weight_scale` (and `weight_scale_2`, `input_scale`), the
                       format of each layer named by the header's `_quantization_metadata` JSON
                       ({"layers": {name: {"format": ..., "group_size": ...}}}) or a per-layer
                       `X.comfy_quant` tensor (the JSON as uint8 bytes).
Formats run here (all weight-only, dequantized per layer; each runs on 30- and 40-series cards):
float8_e4m3fn, float8_e5m2 (per-tensor or per-row scale), int8_tensorwise, int8_blockwise (a scale
per block: per row of `group_size` inputs, or per 2-D block). Anything else (nvfp4, mxfp8, w4a4,
awq …) is an UnsupportedFormatError naming the layer and the format. `input_scale` (static
activation scales) is read and checked but not used: W8A8 here quantizes activations per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CorruptCheckpointError, UnsupportedFormatError
from .jsonfile import parse_json

MAX_LAYER_JSON = 1 << 16  # bytes of one `.comfy_quant` layer description (ComfyUI's are ~40)

STORAGE = {"float8_e4m3fn": ("F8_E4M3",), "float8_e5m2": ("F8_E5M2",), "int8_tensorwise": ("I8",),
           "int8_blockwise": ("I8",)}
REFUSED = {"nvfp4": "needs FP4 tensor cores (RTX 50-series / Blackwell)",
           "mxfp8": "needs MX block scaling (Blackwell)",
           "convrot_w4a4": "a 4-bit activation format with no kernel here",
           "asym_w4a8_int8": "a 4-bit weight format with no kernel here",
           "awq_w4a16": "an AWQ format with no kernel here"}
INSTEAD = ("use a GGUF (Q8_0 / Q4_K) or float8_e4m3fn file, or quantize the bf16 file with "
           "`python -m krea2_lite.quantize`")
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".scale_weight", ".scale_input", ".comfy_quant",
                  ".pre_quant_scale")


@dataclass(frozen=True)
class ComfyLayer:
    """One quantized linear of a ComfyUI file: its format, the stored key of its weight scale, the
    weight's safetensors dtype, and the group size the metadata gives (None if none)."""

    format: str
    scale_key: str | None
    weight_dtype: str
    group_size: int | None = None


def is_comfy_quant(keys, metadata: dict | None) -> bool:
    return ("scaled_fp8" in keys or "_quantization_metadata" in (metadata or {})
            or any(k.endswith((".weight_scale", ".comfy_quant", ".scale_weight")) for k in keys))


def _metadata_layers(metadata: dict | None, where: str, strip) -> dict[str, dict]:
    raw = (metadata or {}).get("_quantization_metadata")
    if raw is None:
        return {}
    try:  # the guarded reader: a header is untrusted text (depth, size and integer limits)
        layers = parse_json(raw, where=where, required=("layers",), what="_quantization_metadata")["layers"]
        return {strip(name): dict(cfg) for name, cfg in layers.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptCheckpointError(f"{where}: unreadable _quantization_metadata in the header") from None


def comfy_layers(stored: dict, metadata: dict | None, where: str, read, strip=lambda k: k) -> dict[str, ComfyLayer]:
    """{official module name: ComfyLayer} of a ComfyUI quantized checkpoint whose tensors `stored` are
    {official name: (file, key, info)}; `read(name)` returns a small tensor (a `comfy_quant` entry)."""
    configs = _metadata_layers(metadata, where, strip)
    for name in stored:
        if name.endswith(".comfy_quant"):
            shape = stored[name][2].shape
            if math.prod(shape) > MAX_LAYER_JSON:  # a layer description is a few dozen bytes
                raise CorruptCheckpointError(f"{where}: '{name}' holds {math.prod(shape)} bytes; a JSON layer "
                                             f"description holds at most {MAX_LAYER_JSON}")
            try:
                configs[name[:-len(".comfy_quant")]] = parse_json(bytes(read(name).tolist()), where=f"{where}: '{name}'",
                                                                  expect=None, what="the layer description")
            except ValueError:
                raise CorruptCheckpointError(f"{where}: '{name}' is not a JSON layer description") from None
    layers = {}
    for module, cfg in configs.items():
        fmt = cfg.get("format") if isinstance(cfg, dict) else None
        if module + ".weight" not in stored:
            raise CorruptCheckpointError(f"{where}: _quantization_metadata names layer '{module}', which has no weight")
        if fmt in REFUSED:
            raise UnsupportedFormatError(f"{where}: layer '{module}' is {fmt}, which {REFUSED[fmt]}; {INSTEAD}")
        if fmt not in STORAGE:
            raise UnsupportedFormatError(f"{where}: layer '{module}' has the unknown ComfyUI format {fmt!r}; "
                                         f"krea2_lite reads {', '.join(STORAGE)}; {INSTEAD}")
        layers[module] = _layer(stored, module, fmt, cfg.get("group_size"), where)
    for name, (_, _, info) in stored.items():  # legacy scaled_fp8: every float8 weight with a scale_weight
        module = name[:-len(".weight")]
        if name.endswith(".weight") and module not in layers and info.dtype in ("F8_E4M3", "F8_E5M2"):
            fmt = "float8_e4m3fn" if info.dtype == "F8_E4M3" else "float8_e5m2"
            layers[module] = _layer(stored, module, fmt, None, where, scale=".scale_weight")
    return layers


def _layer(stored: dict, module: str, fmt: str, group, where: str, scale: str = ".weight_scale") -> ComfyLayer:
    info = stored[module + ".weight"][2]
    if info.dtype not in STORAGE[fmt]:
        raise CorruptCheckpointError(f"{where}: '{module}.weight' is {info.dtype} but its format {fmt} stores "
                                     f"{STORAGE[fmt][0]}")
    key = module + scale if module + scale in stored else None
    if key is None and fmt != "float8_e4m3fn" and fmt != "float8_e5m2":
        raise CorruptCheckpointError(f"{where}: layer '{module}' ({fmt}) has no '{module}{scale}'")
    return ComfyLayer(fmt, key, info.dtype, int(group) if group else None)


def scale_blocks(scale_shape: tuple[int, ...], out_features: int, in_features: int, group: int | None,
                 where: str, name: str) -> tuple[int, int]:
    """(rows, columns) of the weight each scale entry covers, from the scale's shape: a scalar
    (the whole tensor), (out,) / (out, 1) (a row), or (out/bn, in/bk) (a bn×bk block)."""
    dims = [d for d in scale_shape]
    if len(dims) == 0 or dims == [1] or dims == [1, 1]:
        return out_features, in_features
    if dims in ([out_features], [out_features, 1]):
        block = (1, in_features)
    elif len(dims) == 2 and dims[0] and dims[1] and out_features % dims[0] == 0 and in_features % dims[1] == 0:
        block = (out_features // dims[0], in_features // dims[1])
    else:
        raise CorruptCheckpointError(f"{where}: '{name}' has shape {tuple(scale_shape)}, which fits no block of a "
                                     f"({out_features}, {in_features}) weight")
    if group is not None and block[1] != group and block != (1, in_features):
        raise CorruptCheckpointError(f"{where}: '{name}' gives blocks of {block[1]} inputs but the metadata says "
                                     f"group_size {group}")
    return block


def check_scale(scale: torch.Tensor, where: str, name: str) -> None:
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise CorruptCheckpointError(f"{where}: '{name}' holds a NaN, infinite, zero or negative scale")
