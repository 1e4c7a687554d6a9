"""LoRA tensor keys → official Krea 2 module names.

A LoRA key is `<prefix><module><suffix>`:
  prefix   `transformer.` (diffusers pipelines), `diffusion_model.` / `model.diffusion_model.`
           (krea-2's ComfyUI layout), `base_model.model.` (PEFT / AI-Toolkit); stripped.
  module   an official name (`blocks.0.attn.wq`), a diffusers `Krea2Transformer2DModel` name
           (`transformer_blocks.0.attn.to_q`, mapped with `checkpoint.diffusers_to_official_key`),
           or a kohya name: `lora_unet_` + either of those with every `.` turned into `_`
           (`lora_unet_blocks_0_attn_wq`, `lora_unet_transformer_blocks_0_attn_to_q`).
  suffix   `.lora_A.weight` / `.lora_B.weight` (PEFT, diffusers, krea-2 ComfyUI), `.lora_A` /
           `.lora_B` (krea-2 training checkpoints), `.lora_down.weight` / `.lora_up.weight` /
           `.alpha` (kohya), `.lora_A.default.weight` (PEFT's adapter-name infix).
Module names carry underscores themselves (`to_q`, `txtfusion.layerwise_blocks`), so kohya names
are looked up in a table of the model's own modules, flattened, never split on `_`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..files.checkpoint import diffusers_to_official_key

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
# `lora_` alone: some trainers write `lora_transformer_blocks_0_…` for diffusers names.
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_")
# (suffix, role), longest first so `.lora_A.weight` wins over `.lora_A`.
SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A", "down"), (".lora_B", "up"), (".alpha", "alpha"),
)
# Adapter types that are not a plain low-rank pair: recognised to say so, not applied.
UNSUPPORTED_MARKERS = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_mid": "LoCon (conv mid weights)"}
UNSUPPORTED_ENDINGS = {".diff": "full weight difference", ".diff_b": "bias difference",
                       ".lora_B.bias": "LoRA bias", ".lora_up.bias": "LoRA bias"}

# Official → diffusers module names (the inverse of checkpoint.diffusers_to_official_key for the
# linear layers): whole-prefix rewrites, then rewrites inside attention and MLP blocks.
_TO_DIFFUSERS_PREFIXES = (
    ("first", "img_in"), ("tmlp.0", "time_embed.linear_1"), ("tmlp.2", "time_embed.linear_2"),
    ("tproj.1", "time_mod_proj"), ("txtmlp.1", "txt_in.linear_1"), ("txtmlp.3", "txt_in.linear_2"),
    ("last.linear", "final_layer.linear"), ("txtfusion.", "text_fusion."), ("blocks.", "transformer_blocks."),
)
_TO_DIFFUSERS_LEAVES = {"attn.wq": "attn.to_q", "attn.wk": "attn.to_k", "attn.wv": "attn.to_v",
                        "attn.wo": "attn.to_out.0", "attn.gate": "attn.to_gate",
                        "mlp.gate": "ff.gate", "mlp.up": "ff.up", "mlp.down": "ff.down"}


def official_to_diffusers(module: str) -> str:
    """`blocks.3.attn.wq` → `transformer_blocks.3.attn.to_q` (linear layers only)."""
    for old, new in _TO_DIFFUSERS_PREFIXES:
        if module == old or module.startswith(old + ".") or (old.endswith(".") and module.startswith(old)):
            module = new + module[len(old):]
            break
    for old, new in _TO_DIFFUSERS_LEAVES.items():
        if module.endswith("." + old):
            return module[: -len(old)] + new
    return module


def diffusers_to_official(module: str) -> str:
    """A diffusers module name → official (unchanged when it is official already)."""
    return diffusers_to_official_key(module + ".weight")[: -len(".weight")]


class ParsedKey(NamedTuple):
    module: str | None  # official module name, None when the model has no such module
    raw: str            # the module part of the key as written (prefix and suffix removed)
    role: str           # "down" (A), "up" (B) or "alpha"


class ModuleIndex:
    """Every linear layer of one model under each spelling a LoRA may use."""

    def __init__(self, modules: list[str]):
        self.official = set(modules)
        self.flat: dict[str, str] = {}
        for name in modules:
            self.flat[name.replace(".", "_")] = name
            self.flat[official_to_diffusers(name).replace(".", "_")] = name

    def resolve(self, raw: str) -> str | None:
        if raw in self.official:
            return raw
        if "." not in raw and raw.startswith(KOHYA_PREFIXES):
            # Try every prefix reading: `lora_transformer_blocks_0_…` may be `lora_` + a diffusers name.
            hits = [self.flat[raw[len(p):]] for p in KOHYA_PREFIXES
                    if raw.startswith(p) and raw[len(p):] in self.flat]
            return hits[0] if hits else None
        converted = diffusers_to_official(raw)
        return converted if converted in self.official else None


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def split_key(key: str) -> tuple[str, str] | None:
    """(module part, role) of a LoRA key, or None when the suffix is not a LoRA pair's."""
    body = strip_prefixes(key)
    for suffix, role in SUFFIXES:
        if body.endswith(suffix):
            return body[: -len(suffix)], role
    return None


def unsupported_kind(key: str) -> str | None:
    for marker, kind in UNSUPPORTED_MARKERS.items():
        if marker in key:
            return kind
    for ending, kind in UNSUPPORTED_ENDINGS.items():
        if key.endswith(ending):
            return kind
    return None


def why_unknown(key: str, raw: str, layers: int) -> str:
    """Why `raw` (from `key`) names no linear layer of a `layers`-block Krea 2 transformer."""
    flat = raw
    for prefix in KOHYA_PREFIXES:
        if flat.startswith(prefix):
            flat = flat[len(prefix):]
            break
    if re.search(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]", flat):
        return "this LoRA targets FLUX-style modules (double_blocks / single_blocks) — not a Krea 2 LoRA"
    if re.search(r"(^|[._])(input_blocks|output_blocks|down_blocks|up_blocks|mid_block)[._]", flat):
        return "this LoRA targets a Stable Diffusion UNet (down_blocks / input_blocks) — not a Krea 2 LoRA"
    if re.search(r"(add_[qkv]_proj|img_mlp|txt_mlp|img_mod|txt_mod|to_add_out)", flat):
        return ("this LoRA targets a two-stream MMDiT (img_mlp / add_q_proj: Qwen-Image, SD3, ...) "
                "— not a Krea 2 LoRA")
    if raw.startswith(("lora_te", "text_encoder", "te_", "lora_te1_", "lora_te2_")):
        return ("this LoRA key targets the text encoder; krea2_lite applies LoRAs to the transformer only "
                "(strip the text-encoder keys to use the rest)")
    match = re.search(r"(?:^|[._])blocks[._](\d+)[._]", flat)
    if match and int(match.group(1)) >= layers:
        dotted = diffusers_to_official(raw) if "." in raw else flat
        return (f"it targets module {dotted} (block {match.group(1)}), which this {layers}-block model "
                "does not have")
    return f"'{raw}' is not a linear layer of the Krea 2 transformer"
