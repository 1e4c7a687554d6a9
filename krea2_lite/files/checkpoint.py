"""Read and convert Krea 2 transformer checkpoints: layouts, key names, config inference, checks.

Layouts read (always safetensors; pickle files are refused, never opened):
  official single file   keys as in krea-2 `mmdit.py` (`blocks.3.attn.wq.weight`, ...)
  ComfyUI single file    the same keys behind `model.diffusion_model.`
  diffusers folder       `transformer/` of a diffusers pipeline (sharded or not), whose
                         `Krea2Transformer2DModel` names are mapped back to the official ones
  Hugging Face hub id    resolved with huggingface_hub to one of the above

Finding the files is `weight_files`; the model config inferred from the shapes, and the check of
keys and shapes against it, are `loading.transformer_config`; filling a model is `loading.fill`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NotKrea2CheckpointError, SafetensorsSetError
from .comfy_layouts import SCALE_SUFFIXES, ComfyLayer, comfy_layers, is_comfy_quant
from .gguf_container import GGUFFile, is_gguf, read_gguf
from .jsonfile import read_json
from .paths import resolve_path
from .safetensors_headers import TensorInfo, open_safetensors, read_tensor, require_float
from .weight_files import find_weight_files, tensor_locations

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Present in every Krea 2 transformer checkpoint, in official names.
SIGNATURE_KEYS = ("first.weight", "txtfusion.projector.weight", "tproj.1.weight")

# diffusers Krea2Transformer2DModel → official, as whole-prefix rewrites (first match wins) ...
_DIFFUSERS_PREFIXES = (
    ("img_in.", "first."),
    ("time_embed.linear_1.", "tmlp.0."),
    ("time_embed.linear_2.", "tmlp.2."),
    ("time_mod_proj.", "tproj.1."),
    ("txt_in.norm.weight", "txtmlp.0.scale"),
    ("txt_in.linear_1.", "txtmlp.1."),
    ("txt_in.linear_2.", "txtmlp.3."),
    ("text_fusion.", "txtfusion."),
    ("transformer_blocks.", "blocks."),
    ("final_layer.linear.", "last.linear."),
    ("final_layer.norm.weight", "last.norm.scale"),
    ("final_layer.scale_shift_table", "last.modulation.lin"),
)
# ... then substring rewrites inside blocks.
_DIFFUSERS_INFIXES = (
    (".attn.to_q.", ".attn.wq."),
    (".attn.to_k.", ".attn.wk."),
    (".attn.to_v.", ".attn.wv."),
    (".attn.to_out.0.", ".attn.wo."),
    (".attn.to_gate.", ".attn.gate."),
    (".attn.norm_q.weight", ".attn.qknorm.qnorm.scale"),
    (".attn.norm_k.weight", ".attn.qknorm.knorm.scale"),
    (".ff.", ".mlp."),
    (".norm1.weight", ".prenorm.scale"),
    (".norm2.weight", ".postnorm.scale"),
    (".scale_shift_table", ".mod.lin"),
)


def diffusers_transformer_kwargs(cfg) -> dict:
    """diffusers `Krea2Transformer2DModel`'s constructor arguments for the shape `cfg` (a Krea2Config; for writing
    diffusers-layout folders and reference models; krea2_lite itself never imports diffusers)."""
    return dict(in_channels=cfg.in_channels, num_layers=cfg.layers, attention_head_dim=cfg.headdim,
                num_attention_heads=cfg.heads, num_key_value_heads=cfg.kvheads, intermediate_size=cfg.mlpdim,
                timestep_embed_dim=cfg.tdim, text_hidden_dim=cfg.txtdim, num_text_layers=cfg.txtlayers,
                text_num_attention_heads=cfg.txtheads, text_num_key_value_heads=cfg.txtkvheads,
                text_intermediate_size=cfg.txtmlpdim, axes_dims_rope=cfg.axes, rope_theta=cfg.theta)


def diffusers_to_official_key(key: str) -> str:
    for old, new in _DIFFUSERS_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    for old, new in _DIFFUSERS_INFIXES:
        key = key.replace(old, new)
    return key


def keeps_fp32(name: str) -> bool:
    """Norm scales and modulation tables stay float32 whatever the model dtype."""
    return name.endswith(".scale") or name.endswith("mod.lin") or name == "last.modulation.lin"


# ---- files ----------------------------------------------------------------------------------

@dataclass
class CheckpointSource:
    """Where a transformer's tensors live: official name → (file, stored key, header info)."""

    location: Path
    layout: str  # "official" | "comfyui" | "diffusers"
    entries: dict[str, tuple[Path, str, TensorInfo]] = field(default_factory=dict)
    diffusers_config: dict | None = None
    gguf: GGUFFile | None = None  # a GGUF file's reader (entries' dtypes are then ggml type names)
    comfy: dict[str, ComfyLayer] | None = None  # a ComfyUI quantized file: its quantized layers ...
    scales: dict[str, tuple[Path, str, TensorInfo]] = field(default_factory=dict)  # ... and their scales

    @property
    def format(self) -> str:
        """The container as stored: "gguf", "comfy-quantized" (ComfyUI fp8 / int8) or "safetensors"."""
        return "gguf" if self.gguf is not None else "comfy-quantized" if self.comfy is not None else "safetensors"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Official-layout shapes (diffusers' (6, d) modulation tables flattened)."""
        out = {}
        for name, (_, _, info) in self.entries.items():
            shape = info.shape
            out[name] = (shape[0] * shape[1],) if name.endswith("mod.lin") and len(shape) == 2 else shape
        return out


def _transformer_weights(location: Path):
    """The weight files of a transformer at `location` (file, folder, or a pipeline's transformer/)
    and its diffusers config, if any."""
    if location.is_dir() and (location / "model_index.json").exists() and (location / "transformer").is_dir():
        location = location / "transformer"
    config = None
    if location.is_dir() and (location / "config.json").exists():
        config = read_json(location / "config.json", what="transformer config")
    weights = find_weight_files(location, what="model")
    return weights, config


def open_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Locate and validate a Krea 2 transformer checkpoint; reads headers only."""
    location = resolve_path(path, parts=("transformer",))
    gguf = None
    if location.is_file() and (is_gguf(location) or location.suffix.lower() == ".gguf"):
        gguf, config = read_gguf(location), None  # recognised by its magic; a bad one is named here
        stored = {key: (location, key, TensorInfo(t.qtype, t.shape, t.start, t.end)) for key, t in gguf.tensors.items()}
    else:
        weights, config = _transformer_weights(location)
        stored = {key: (file, key, info) for key, (file, info) in tensor_locations(weights).items()}

    layout = "official"
    keys = list(stored)
    for prefix in COMFY_PREFIXES:
        if keys and sum(k.startswith(prefix) for k in keys) > len(keys) // 2:
            layout = "comfyui"
            stored = _renamed(stored, lambda k: k[len(prefix):] if k.startswith(prefix) else k, location)
            break
    if "img_in.weight" in stored or any(k.startswith("transformer_blocks.") for k in stored):
        layout = "diffusers"
        stored = _renamed(stored, diffusers_to_official_key, location)
    if not all(k in stored for k in SIGNATURE_KEYS):
        raise NotKrea2CheckpointError(f"{location}: not a Krea 2 checkpoint ({_guess_family(keys)})")
    stored, comfy, scales = _split_comfy(stored, location) if gguf is None else (stored, None, {})
    if gguf is None:
        quantized = {m + ".weight" for m in comfy or {}}
        require_float({k: v for k, v in stored.items() if k not in quantized})  # Krea 2 tensors are floats
    return CheckpointSource(location, layout, stored, config, gguf, comfy, scales)


def _split_comfy(stored: dict, location: Path):
    """(model tensors, ComfyUI quantized layers or None, their scale tensors) of a safetensors checkpoint."""
    files = {file for file, _, _ in stored.values()}
    metadata = open_safetensors(next(iter(files))).metadata() if len(files) == 1 else None
    if not is_comfy_quant(stored, metadata):
        return stored, None, {}

    def read(name):
        file, _, info = stored[name]
        return read_tensor(file, info)

    strip = _comfy_name(stored)
    layers = comfy_layers(stored, metadata, str(location), read, strip)
    scales = {layer.scale_key: stored[layer.scale_key] for layer in layers.values() if layer.scale_key}
    for name, entry in list(stored.items()):  # a float weight's legacy scale_weight multiplies it
        if name.endswith(".scale_weight") and name not in scales:
            scales[name] = entry
    model = {k: v for k, v in stored.items() if k not in scales and k != "scaled_fp8"
             and not k.endswith(SCALE_SUFFIXES)}
    return model, layers, scales


def _comfy_name(stored: dict):
    """How `_quantization_metadata` layer names map to official ones: the file's ComfyUI prefix
    dropped, diffusers names rewritten."""
    def strip(name: str) -> str:
        for prefix in COMFY_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        return diffusers_to_official_key(name + ".weight")[:-len(".weight")]
    return strip


def _renamed(stored: dict, rename, location: Path) -> dict:
    """`stored` under new names; two stored keys that map to one name (a ComfyUI file that also holds
    the bare name, mixed diffusers and official names) are refused rather than one silently kept."""
    out = {}
    for key, value in stored.items():
        new = rename(key)
        if new in out:
            raise SafetensorsSetError(f"{location}: '{out[new][1]}' and '{key}' are the same tensor "
                                      f"('{new}') under two names; keep one")
        out[new] = value
    return out


def _guess_family(keys: list[str]) -> str:
    joined = " ".join(keys[:2000])
    if "double_blocks." in joined or "single_blocks." in joined:
        return "its keys look like a FLUX transformer"
    if "model.diffusion_model.input_blocks." in joined or "input_blocks." in joined:
        return "its keys look like a Stable Diffusion UNet"
    if "transformer_blocks." in joined:
        return "its keys look like another diffusers transformer"
    if not keys:
        return "it holds no tensors"
    return f"none of {list(SIGNATURE_KEYS)} is present; first keys: {keys[:3]}"
