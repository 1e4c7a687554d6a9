"""Write ComfyUI quantized checkpoints the way ComfyUI's tooling does: legacy `scaled_fp8` files and
mixed-precision files with `weight_scale` and `_quantization_metadata` (or per-layer `comfy_quant`)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

PREFIX = "model.diffusion_model."


def _block_linears(state: dict) -> list[str]:
    return [k[:-len(".weight")] for k, v in state.items() if k.startswith("blocks.") and k.endswith(".weight")
            and v.ndim == 2]


def scaled_fp8(path, state: dict, dtype=torch.float8_e4m3fn) -> tuple[dict, dict]:
    """Legacy scaled_fp8: per-tensor absmax scale, `scale_weight` / `scale_input`, the marker tensor.
    Returns (reference float32 state, written tensors)."""
    out, reference = {"scaled_fp8": torch.empty(0, dtype=dtype)}, {}
    linears = set(_block_linears(state))
    for name, value in state.items():
        module = name[:-len(".weight")]
        if module in linears and name.endswith(".weight"):
            scale = value.abs().max() / torch.finfo(dtype).max
            q = (value / scale).to(dtype)
            out[PREFIX + name], out[PREFIX + module + ".scale_weight"] = q, scale.float().reshape(())
            out[PREFIX + module + ".scale_input"] = torch.ones((), dtype=torch.float32)
            reference[name] = q.float() * scale.float()
        else:
            out[PREFIX + name] = value.to(torch.bfloat16)
            reference[name] = value.to(torch.bfloat16).float()
    save_file(out, path)
    return reference, out


def int8_blocks(value: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = block
    n, k = value.shape
    blocks = value.reshape(n // rows, rows, k // cols, cols)
    scale = blocks.abs().amax(dim=(1, 3)) / 127
    q = torch.round(blocks / scale[:, None, :, None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return q, scale.float()


def mixed(path, state: dict, formats: dict, per_layer: bool = False) -> dict:
    """Mixed precision: `formats` {module: (format, block or None)} — float8_e4m3fn (per-tensor scale,
    input_scale), int8_blockwise with a (rows, cols) block. Metadata in the header, or (`per_layer`)
    one `comfy_quant` JSON tensor per layer. Returns the reference float32 state."""
    out, reference, layers = {}, {}, {}
    for name, value in state.items():
        module = name[:-len(".weight")]
        fmt, block = formats.get(module, (None, None)) if name.endswith(".weight") else (None, None)
        if fmt == "float8_e4m3fn":
            scale = (value.abs().max() / 448).float()
            q = (value / scale).to(torch.float8_e4m3fn)
            out[PREFIX + name], out[PREFIX + module + ".weight_scale"] = q, scale.reshape(())
            out[PREFIX + module + ".input_scale"] = torch.ones((), dtype=torch.float32)
            reference[name] = q.float() * scale
            layers[module] = {"format": fmt}
        elif fmt == "int8_blockwise":
            q, scale = int8_blocks(value, block)
            out[PREFIX + name], out[PREFIX + module + ".weight_scale"] = q, scale
            rows, cols = block
            reference[name] = (q.float().reshape(scale.shape[0], rows, scale.shape[1], cols)
                               * scale[:, None, :, None]).reshape(value.shape)
            layers[module] = {"format": fmt, "group_size": cols}
        else:
            out[PREFIX + name] = value.to(torch.bfloat16)
            reference[name] = value.to(torch.bfloat16).float()
    metadata = None
    if per_layer:
        for module, cfg in layers.items():
            out[PREFIX + module + ".comfy_quant"] = torch.tensor(list(json.dumps(cfg).encode()), dtype=torch.uint8)
    else:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
            PREFIX + m: cfg for m, cfg in layers.items()}})}
    save_file(out, path, metadata=metadata)
    return reference
