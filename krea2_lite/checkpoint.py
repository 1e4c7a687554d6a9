"""Find, read and convert Krea 2 transformer checkpoints; `load_transformer`.

Layouts read (always safetensors; pickle files are refused, never opened):
  official single file   keys as in krea-2 `mmdit.py` (`blocks.3.attn.wq.weight`, ...)
  ComfyUI single file    the same keys behind `model.diffusion_model.`
  diffusers folder       `transformer/` of a diffusers pipeline (sharded or not), whose
                         `Krea2Transformer2DModel` names are mapped back to the official ones
  Hugging Face hub id    resolved with huggingface_hub to one of the above
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from .config import Krea2Config, swiglu_width
from .errors import (CheckpointKeysError, CheckpointNotFoundError, CorruptCheckpointError, Krea2LiteError,
                     NotKrea2CheckpointError, SafetensorsSetError, ShapeMismatchError,
                     UnsafeCheckpointFormatError)
from .jsonfile import parse_json, read_json
from .safetensors_set import check_entry, check_float_dtype, locate_tensors, read_weight_map, require_float
from .model import Krea2Transformer

logger = logging.getLogger("krea2_lite")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
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


def diffusers_transformer_kwargs(cfg: Krea2Config) -> dict:
    """diffusers `Krea2Transformer2DModel`'s constructor arguments for the shape `cfg` (for writing
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


# ---- files ---------------------------------------------------------------------------------

def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointFormatError(
            f"{path}: '{path.suffix}' files are pickle-based and are never opened by krea2_lite "
            "(unpickling can run arbitrary code). Convert the checkpoint to .safetensors first.")


class TensorInfo(NamedTuple):
    dtype: str                 # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int                 # absolute byte offsets in the file
    end: int


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Validate a safetensors file without reading its tensors; returns {key: TensorInfo}.

    Catches the failures safetensors reports vaguely: empty files, a header longer than the
    file, unparsable JSON, and data offsets past the end of the file (a truncated download).
    """
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path}: the file is empty (0 bytes); re-download or re-save it")
    if size < 8:
        raise CorruptCheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise CorruptCheckpointError(
                f"{path}: the header claims {header_len} bytes but the file has {size}; "
                "this is not a safetensors file, or it is truncated")
        raw = fh.read(header_len)
    try:
        header = parse_json(raw.decode("utf-8"), where=str(path), what="safetensors header")
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    data_len = size - 8 - header_len
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            tensors[key] = TensorInfo(info["dtype"], tuple(info["shape"]), 8 + header_len + start,
                                      8 + header_len + end)
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: malformed header entry for tensor '{key}'") from None
        if end > data_len or start > end:
            raise CorruptCheckpointError(
                f"{path}: tensor '{key}' ends at byte {end} of the data but only {data_len} bytes are "
                "present; the file is truncated (an interrupted download?)")
        check_entry(path, key, *tensors[key][:2], start, end)
    return tensors


def open_safetensors(file: Path, device: str = "cpu"):
    """`safe_open` with one clear error for files safetensors cannot read."""
    try:
        return safe_open(str(file), framework="pt", device=device)
    except Exception as exc:  # safetensors raises its own error type (and OSError)
        raise CorruptCheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """Read one tensor with a plain file read into fresh memory (no memory map).

    For streaming work (quantizing while loading): the bytes are released when the tensor is,
    instead of staying mapped — and counted in the process's resident memory — until the file
    is closed.
    """
    dtype = SAFETENSORS_DTYPES.get(info.dtype)
    if dtype is None:
        raise CorruptCheckpointError(f"{path}: unsupported tensor dtype {info.dtype}")
    buffer = torch.empty(info.end - info.start, dtype=torch.uint8)
    with open(path, "rb") as fh:
        fh.seek(info.start)
        if fh.readinto(buffer.numpy()) != len(buffer):
            raise CorruptCheckpointError(f"{path}: short read; the file changed or is truncated")
    return buffer.view(dtype).reshape(info.shape)


@dataclass
class CheckpointSource:
    """Where a transformer's tensors live: official name → (file, stored key, header info)."""

    location: Path
    layout: str  # "official" | "comfyui" | "diffusers"
    entries: dict[str, tuple[Path, str, TensorInfo]] = field(default_factory=dict)
    diffusers_config: dict | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Official-layout shapes (diffusers' (6, d) modulation tables flattened)."""
        out = {}
        for name, (_, _, info) in self.entries.items():
            shape = info.shape
            out[name] = (shape[0] * shape[1],) if name.endswith("mod.lin") and len(shape) == 2 else shape
        return out


def looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "/"))


def resolve_path(path: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """A local file or folder as given, or a Hugging Face hub id downloaded with huggingface_hub.

    Only files matching `allow_patterns` are fetched (weights as safetensors, never pickles).
    """
    text = os.fspath(path)
    location = Path(text).expanduser()
    if location.exists():
        return location
    if not looks_like_hub_id(text):
        raise CheckpointNotFoundError(f"{location}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a hard dependency
        raise CheckpointNotFoundError(f"{text}: no such path, and huggingface_hub is not installed") from None
    patterns = allow_patterns or ["*.json", "*.safetensors", "*/*.json", "*/*.safetensors"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointNotFoundError(
            f"'{text}' is not a local path, and fetching it from the Hugging Face hub failed: "
            f"{type(exc).__name__}: {exc}") from None


def _transformer_files(folder: Path) -> tuple[list[Path], dict | None, Path | None]:
    """The safetensors files holding a transformer inside `folder`, its diffusers config and its
    shard index (None when unsharded)."""
    if (folder / "model_index.json").exists() and (folder / "transformer").is_dir():
        folder = folder / "transformer"
    config = None
    if (folder / "config.json").exists():
        config = read_json(folder / "config.json", what="transformer config")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        names = sorted(set(read_weight_map(indexes[0]).values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointNotFoundError(f"{indexes[0]}: lists shards that are missing: {missing[:3]}")
        return [folder / n for n in names], config, indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files, config, None
    pickles = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        _check_not_pickle(pickles[0])
    raise CheckpointNotFoundError(
        f"{folder}: no model found (expected a .safetensors file, a sharded *.safetensors.index.json, "
        "or a diffusers pipeline folder with transformer/)")


def open_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Locate and validate a Krea 2 transformer checkpoint; reads headers only."""
    location = resolve_path(path, ["*.json", "*.safetensors", "transformer/*"])
    config, index = None, None
    if location.is_dir():
        files, config, index = _transformer_files(location)
    else:
        _check_not_pickle(location)
        files = [location]
    # Duplicates across files refused, an index obeyed, byte lengths checked (safetensors_set.py).
    stored = {key: (file, key, info) for key, (file, info) in locate_tensors(files, index=index,
                                                                             where=location).items()}

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
    require_float(stored)  # every Krea 2 transformer tensor is floating point
    return CheckpointSource(location, layout, stored, config)


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


# ---- config --------------------------------------------------------------------------------

def infer_config(shapes: dict[str, tuple[int, ...]], *, theta: float = 1000.0, patch: int = 2,
                 where: str = "checkpoint") -> Krea2Config:
    """Recover a Krea2Config from official-layout tensor shapes (patch 2 unless given)."""
    try:
        return _infer_config(shapes, theta=theta, patch=patch, where=where)
    except Krea2LiteError:
        raise
    except (ValueError, IndexError, ZeroDivisionError, TypeError) as exc:
        # Degenerate shapes (a 0-length norm scale, a 1-D weight) reach arithmetic before any check.
        raise ShapeMismatchError(f"{where}: tensor shapes that fit no Krea 2 transformer ({exc})") from None


def _infer_config(shapes: dict[str, tuple[int, ...]], *, theta: float, patch: int, where: str) -> Krea2Config:
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointKeysError(f"{where}: missing tensor '{name}', needed to infer the model shape")
        return shapes[name]

    features, in_channels = shape("first.weight")
    layers = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if layers == 0:
        raise CheckpointKeysError(f"{where}: no transformer blocks ('blocks.N.*') found")
    headdim = shape("blocks.0.attn.qknorm.qnorm.scale")[0]
    kv_rows = shape("blocks.0.attn.wk.weight")[0]
    txtdim = shape("txtmlp.1.weight")[1]
    txt_headdim = shape("txtfusion.layerwise_blocks.0.attn.qknorm.qnorm.scale")[0]
    txt_kv_rows = shape("txtfusion.layerwise_blocks.0.attn.wk.weight")[0]
    mlp = shape("blocks.0.mlp.gate.weight")[0]
    txt_mlp = shape("txtfusion.layerwise_blocks.0.mlp.gate.weight")[0]
    # Rounding to 128 can make several multipliers give the same widths (same model); prefer
    # the released value 4 then.
    fits = [m for m in range(1, 33) if swiglu_width(features, m) == mlp and swiglu_width(txtdim, m) == txt_mlp]
    if not fits:
        raise ShapeMismatchError(f"{where}: MLP widths {mlp} / {txt_mlp} match no multiplier for "
                                 f"features={features}, txtdim={txtdim}")
    multiplier = 4 if 4 in fits else fits[0]
    if in_channels % (patch * patch):
        raise ShapeMismatchError(f"{where}: input width {in_channels} is not channels·{patch}²")
    return Krea2Config(
        features=features, tdim=shape("tmlp.0.weight")[1], txtdim=txtdim,
        heads=features // headdim, kvheads=kv_rows // headdim, multiplier=multiplier, layers=layers,
        patch=patch, channels=in_channels // (patch * patch), txtheads=txtdim // txt_headdim,
        txtkvheads=txt_kv_rows // txt_headdim, txtlayers=shape("txtfusion.projector.weight")[1],
        theta=float(theta))


def _check_diffusers_config(cfg: dict, config: Krea2Config, where: Path) -> None:
    """A diffusers config may say things the tensor shapes cannot; they must agree with `config`."""
    axes = cfg.get("axes_dims_rope")
    if axes is not None and tuple(axes) != config.axes:
        raise ShapeMismatchError(f"{where}/config.json: axes_dims_rope={list(axes)} differs from the "
                                 f"Krea 2 split {list(config.axes)} for head dim {config.headdim}")
    theta = cfg.get("rope_theta")
    if theta is not None and float(theta) != config.theta:
        raise ShapeMismatchError(f"{where}/config.json: rope_theta={theta} but the config says {config.theta}")


def expected_shapes(config: Krea2Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Krea2Transformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_keys_and_shapes(source: CheckpointSource, config: Krea2Config, explicit: bool) -> None:
    expected = expected_shapes(config)
    found = source.shapes()
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[:4]})")
        raise CheckpointKeysError(f"{source.location}: tensors do not match a Krea 2 transformer with "
                                  f"{config.layers} blocks: " + "; ".join(parts))
    wrong = [(k, found[k], expected[k]) for k in expected if found[k] != expected[k]]
    if wrong:
        k, got, want = wrong[0]
        origin = "the given config" if explicit else "the config inferred from the file"
        raise ShapeMismatchError(f"{source.location}: tensor '{k}' has shape {got} but {origin} expects "
                                 f"{want} ({len(wrong)} tensor(s) disagree)")


# ---- loading -------------------------------------------------------------------------------

def assign_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor, device: torch.device,
                  dtype: torch.dtype) -> None:
    """Put a checkpoint tensor (official name and layout) into the meta-built model, cast by
    the dtype policy (norm scales and modulation tables float32, the rest `dtype`)."""
    if name.endswith("mod.lin") and tensor.ndim == 2 and name != "last.modulation.lin":
        tensor = tensor.reshape(-1)  # diffusers stores the six block tables as (6, dim)
    target = torch.float32 if keeps_fp32(name) else dtype
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent)
    tensor = tensor.to(device=device, dtype=target)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def load_transformer(path: str | os.PathLike, *, config: Krea2Config | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     quant=None, progress: bool | None = None) -> Krea2Transformer:
    """Load a Krea 2 transformer from any supported layout (see the module docstring).

    The model is built on the meta device and each tensor is streamed from its file straight
    into place (`assign`), cast on its own: norm scales and modulation tables stay float32, the
    rest becomes `dtype`. On the CPU a tensor already in `dtype` stays memory-mapped
    (copy-on-write: the file is never modified), so host memory stays near one copy of the
    weights. `config=None` infers the shape from the tensors. Returns the model in eval mode
    with gradients off.

    `quant` ("int8" | "fp8" | "int4" | "int8-w8a8[-rot]" | "fp8-w8a8[-rot]" | QuantSpec) quantizes
    while streaming: the float model is never whole in memory. A krea2_lite quantized folder loads as it was written.
    """
    from .quantize import QuantSpec
    from .quantize.format import is_quantized_folder, load_quantized_folder, read_manifest

    spec = QuantSpec.parse(quant)
    check_float_dtype(dtype)  # int8 etc. are asked for with quant=, never dtype=
    device = torch.device(device)
    location = resolve_path(path, ["*.json", "*.safetensors", "transformer/*"])
    if is_quantized_folder(location):
        stored = QuantSpec.from_dict(read_manifest(location)["quant"]).name
        if spec is not None and spec.name != stored:
            raise ValueError(f"{location} is already quantized to {stored}; quant={spec.name!r} cannot apply "
                             "(quantize the float checkpoint instead, or pass quant=None)")
        return load_quantized_folder(location, device=device, dtype=dtype)
    source = open_checkpoint(location)
    explicit = config is not None
    diffusers_config = source.diffusers_config or {}
    if config is None:
        theta = float(diffusers_config.get("rope_theta", Krea2Config.theta))
        config = infer_config(source.shapes(), theta=theta, where=str(source.location))
    _check_diffusers_config(diffusers_config, config, source.location)
    check_keys_and_shapes(source, config, explicit)

    if spec is not None:
        from .quantize.stream import load_quantizing

        return load_quantizing(source, config, spec, device=device, dtype=dtype, progress=progress)
    with torch.device("meta"):
        model = Krea2Transformer(config)
    by_file: dict[Path, list[str]] = {}
    for name, (file, _, _) in source.entries.items():
        by_file.setdefault(file, []).append(name)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(source.entries), desc="loading transformer", unit="tensor",
               disable=(not progress) if progress is not None else None, leave=False)
    load_device = "cpu" if device.type != "cuda" else str(device)
    with bar:
        for file, names in by_file.items():
            with open_safetensors(file, load_device) as handle:
                for name in names:
                    assign_tensor(model, name, handle.get_tensor(source.entries[name][1]), device, dtype)
                    bar.update()
    logger.info("loaded %s layout from %s: %d blocks, %.2fB parameters", source.layout, source.location,
                config.layers, config.num_parameters() / 1e9)
    return model.eval()
