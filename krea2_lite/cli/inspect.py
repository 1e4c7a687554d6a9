"""`python -m krea2_lite inspect FILE_OR_FOLDER`: what a transformer file holds and what it costs.

Reads headers only (no tensor data): the container format and key layout, the config inferred from
the shapes, the stored tensor types with their counts and bytes, the transformer's loaded bytes as
krea2_lite holds it, and the memory planner's placement on 8 / 12 / 16 GB cards (1024², CFG on,
32 GiB of host RAM assumed so the answer does not depend on this machine).
"""

from __future__ import annotations

import pathlib

import torch

from ..errors import MemoryPlanError
from ..files.checkpoint import open_checkpoint
from ..files.paths import resolve_path
from ..files.quantized_folder import is_quantized_folder
from ..loading.transformer import TRANSFORMER_PATTERNS, describe_transformer
from ..offload import plan_memory
from ..offload.sizes import transformer_weights

CARDS_GB = (8, 12, 16)
HOST_GB = 32
GB = 1 << 30


def _size(nbytes: int) -> str:
    return f"{nbytes / GB:.2f} GiB" if nbytes >= GB else f"{nbytes / (1 << 20):.2f} MiB"


def _tensor_types(path) -> tuple[str, str, dict[str, tuple[int, int]]]:
    """(format, layout, {stored type: (count, bytes)}) of a checkpoint, from its headers."""
    source = open_checkpoint(path)
    types: dict[str, tuple[int, int]] = {}
    for _, _, info in (*source.entries.values(), *source.scales.values()):
        count, size = types.get(info.dtype, (0, 0))
        types[info.dtype] = (count + 1, size + info.end - info.start)
    if source.gguf is not None:
        fmt = f"GGUF (general.architecture={source.gguf.architecture!r}, not trusted: shapes decide)"
    elif source.comfy is not None:
        formats = sorted({layer.format for layer in source.comfy.values()})
        fmt = f"ComfyUI quantized safetensors ({', '.join(formats)}; {len(source.comfy)} quantized layers)"
    else:
        fmt = "safetensors"
    return fmt, source.layout, types


def _plan_line(config, quant, vram_gb: float) -> str:
    try:
        plan = plan_memory(config, quant, vram_gb, 1024, 1024, host_ram_gb=HOST_GB)
    except MemoryPlanError as exc:
        return f"  {vram_gb:>2} GB: does not fit ({str(exc).splitlines()[0]})"
    return f"  {vram_gb:>2} GB: {str(plan).splitlines()[0]}"


def inspect_lines(path) -> list[str]:
    """The report `inspect` prints, line by line."""
    if str(path) == "demo" and not pathlib.Path("demo").exists():  # the shipped miniature, as `generate` names it
        from ..demo import demo_path

        path = demo_path()
    location = resolve_path(path, TRANSFORMER_PATTERNS)
    config, quant = describe_transformer(location, None)
    lines = [f"{location}"]
    if is_quantized_folder(location):
        lines.append(f"format: krea2_lite quantized folder ({quant.name})")
    else:
        fmt, layout, types = _tensor_types(location)
        lines += [f"format: {fmt}", f"layout: {layout} names"]
        lines.append("stored tensors:")
        for dtype, (count, size) in sorted(types.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"  {dtype:<8} {count:>5} tensors {_size(size):>12}")
    lines.append(f"config: {config.layers} blocks, width {config.features}, {config.heads}/{config.kvheads} heads, "
                 f"{config.num_parameters() / 1e6:.1f}M parameters")
    weights = transformer_weights(config, quant, torch.bfloat16)
    lines.append(f"transformer in memory (bf16 compute): {_size(weights.total)} "
                 f"(one block {_size(max(weights.blocks))})")
    lines.append(f"plans at 1024x1024 with CFG, {HOST_GB} GiB host RAM, the default Qwen3-VL-4B text encoder:")
    lines += [_plan_line(config, quant, gb) for gb in CARDS_GB]
    return lines


NAME = "inspect"
HELP = "what a transformer file holds (format, types, config) and what it costs"


def add_arguments(parser) -> None:
    parser.add_argument("path", metavar="FILE_OR_FOLDER")


def run(args) -> int:
    for line in inspect_lines(args.path):
        print(line)
    return 0
