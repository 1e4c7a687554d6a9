"""`python -m krea2_lite.quantize --model SRC --dtype {int8,fp8,int4} --out DIR
[--activations {int8,fp8} [--rotate [BLOCK]]] [--lowrank R] [--rounding {mse-clip,minmax}]
[--max-shard-size 2GB]`.

Writes a self-contained quantized folder (see `format.py`), block by block into safetensors
shards of at most --max-shard-size (`write.py`), so host memory holds about one block, not the
model. The work happens in a temporary folder beside DIR that is renamed into place at the end,
so DIR is either absent, the previous DIR (with --force) or complete — never half-written
(`quantize_output.py`). SRC is only read. `krea2_lite/quantize/__main__.py` calls `main` here.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from ..errors import ArgumentError
from ..files.jsonfile import read_json
from ..files.paths import resolve_path
from ..loading.transformer import open_float_checkpoint
from ..files.quantized_folder import folder_size, is_quantized_folder, write_manifest
from ..quantize.int4_rounding import DEFAULT_ROUNDING, ROUNDINGS
from ..quantize.recipe import DEFAULT_INCLUDE, DEFAULT_ROTATE, GROUP_SIZES, ROTATE_SIZES, QuantSpec, require_rank
from ..files.shard_writer import DEFAULT_MAX_SHARD, parse_size
from ..loading.quantized_writer import write_text_encoder, write_transformer
from ..version import __version__
from . import quantize_output
from .error_contract import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m krea2_lite.quantize",
                                description="Quantize a Krea 2 checkpoint into a self-contained folder")
    p.add_argument("--model", required=True, help="transformer .safetensors, diffusers transformer/ or pipeline folder")
    p.add_argument("--dtype", required=True, choices=["int8", "fp8", "int4"])
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES, help="int4 group length (default 128)")
    p.add_argument("--activations", choices=["none", "int8", "fp8"], default="none",
                   help="W8A8: also quantize each layer's input per token at run time (same type as --dtype)")
    p.add_argument("--rotate", type=int, nargs="?", const=DEFAULT_ROTATE, default=0,
                   choices=[r for r in ROTATE_SIZES if r], metavar="BLOCK",
                   help=f"W8A8 only: store weights as W·H (block Hadamard, default block {DEFAULT_ROTATE}) and "
                        "rotate activations before quantizing them (spreads outlier channels)")
    p.add_argument("--lowrank", type=int, default=None, metavar="R",
                   help="int4 only: give each quantized layer a bf16 rank-R correction U·V (int4 stores W − U·V); "
                        "R from 1 to the smallest layer's min(in, out), 32 is the usual choice")
    p.add_argument("--rounding", choices=ROUNDINGS, default=None,
                   help=f"int4 only: how each group's scale is chosen (default {DEFAULT_ROUNDING}: the clipped range "
                        "of least squared error; minmax: optimum-quanto's full range, faster to compute)")
    p.add_argument("--text-encoder-dtype", choices=["int8", "int4", "none"], default="int8",
                   help="for a pipeline source: quantize the Qwen3-VL text path (none = keep bf16)")
    p.add_argument("--include", nargs="*", default=list(DEFAULT_INCLUDE), help="module-name globs to quantize")
    p.add_argument("--exclude", nargs="*", default=[], help="module-name globs to keep in bf16")
    p.add_argument("--variant", choices=["raw", "turbo"], help="record the variant in the manifest")
    p.add_argument("--max-shard-size", type=_shard_size, default=DEFAULT_MAX_SHARD, metavar="SIZE",
                   help=f"largest safetensors file to write, e.g. 500MB, 2GB, 1.5GiB (default {DEFAULT_MAX_SHARD}); "
                        "a larger model is split into shards with a diffusers-style index")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true")
    return p


def _shard_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:  # argparse prints "argument --max-shard-size: ..." and exits 2
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--max-shard-size {text!r}: ")) from None


def estimate_bytes(config, spec: QuantSpec) -> int:
    """What the transformer folder will take: its exact weight bytes for this shape and recipe (the
    planner's count: codes, scales, shifts, an int4-lr branch, the layers kept in bf16) + 1% and
    64 MiB for headers, the index, the map and the manifest."""
    from ..offload.sizes import transformer_weights

    return int(transformer_weights(config, spec, torch.bfloat16).total * 1.01) + (64 << 20)


def check_free_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise OSError(f"{out.parent}: {free / 1e9:.2f} GB free, but the quantized folder needs about "
                      f"{needed / 1e9:.2f} GB")


def source_layout(src: Path) -> tuple[Path, Path | None]:
    """(transformer location, pipeline root or None)."""
    if src.is_dir() and (src / "model_index.json").is_file():
        return src / "transformer", src
    return src, None


def quantize_pipeline_parts(root: Path, tmp: Path, te_dtype: str, progress: bool, max_shard_bytes: int,
                            rounding: str = DEFAULT_ROUNDING) -> dict:
    """Copy or quantize the other components of a pipeline source into `tmp`."""
    components = {}
    if (root / "text_encoder").is_dir():
        te_spec = None if te_dtype == "none" else QuantSpec(te_dtype, rounding=rounding if te_dtype == "int4"
                                                            else DEFAULT_ROUNDING)
        write_text_encoder(root / "text_encoder", tmp / "text_encoder", te_spec, max_shard_bytes=max_shard_bytes)
        components["text_encoder"] = {"path": "text_encoder", "dtype": te_dtype if te_dtype != "none" else "bf16"}
    for name in ("vae", "scheduler"):
        if (root / name).is_dir():
            shutil.copytree(root / name, tmp / name)
            components[name] = {"path": name}
    return components


def quantize_to_folder(args: argparse.Namespace) -> Path:
    src = resolve_path(args.model, progress=not args.quiet)
    out = quantize_output.check_output(args.out, src, args.force)  # never the source, a root, or not ours
    lowrank = 0 if args.lowrank is None else require_rank(args.lowrank, "--lowrank")
    if lowrank and args.dtype != "int4":
        raise ArgumentError(f"--lowrank needs --dtype int4, got --dtype {args.dtype}")
    rounding = args.rounding or DEFAULT_ROUNDING
    if args.group_size is not None and args.dtype != "int4":
        raise ArgumentError(f"--group-size applies to int4 only; {args.dtype} scales each output channel")
    spec = QuantSpec(args.dtype, args.group_size or 128, tuple(args.include), tuple(args.exclude),
                     activations=None if args.activations == "none" else args.activations, rotate=args.rotate,
                     lowrank=lowrank, rounding=rounding if args.dtype == "int4" else DEFAULT_ROUNDING)
    if is_quantized_folder(src):
        raise ArgumentError(f"--model {src} is already a quantized folder; quantize the float checkpoint it came from")
    transformer_path, root = source_layout(src)
    if args.rounding is not None and args.dtype != "int4" and (root is None or args.text_encoder_dtype != "int4"):
        raise ArgumentError(f"--rounding applies to int4 only, got --dtype {args.dtype}"
                         + (f" and --text-encoder-dtype {args.text_encoder_dtype}" if root is not None else ""))
    source, config = open_float_checkpoint(resolve_path(transformer_path))
    source_files = sorted({file for file, _, _ in source.entries.values()})
    source_bytes = sum(f.stat().st_size for f in source_files)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_output.remove_stale(out)
    check_free_space(out, estimate_bytes(config, spec) + (source_bytes // 3 if root else 0))

    started = time.time()
    with quantize_output.removed_on_failure(quantize_output.temporary_folder(out)) as tmp:  # also on SIGINT / SIGTERM
        model, files = write_transformer(source, config, spec, tmp, max_shard_bytes=args.max_shard_size,
                                         progress=not args.quiet)
        shards = sum(name.endswith(".safetensors") for name in files)
        components = {"transformer": {"path": "transformer", "dtype": spec.name if spec.lowrank else args.dtype,
                                      "shards": shards}}
        variant = args.variant
        if root is not None:
            components.update(quantize_pipeline_parts(root, tmp, args.text_encoder_dtype, not args.quiet,
                                                      args.max_shard_size, rounding))
            index = read_json(root / "model_index.json", what="model_index.json")
            if variant is None and isinstance(index.get("is_distilled"), bool):
                variant = "turbo" if index["is_distilled"] else "raw"
            # krea2_lite: the source folder's own steps / guidance / size (the demo's 64² × 20).
            for key in ("text_encoder_select_layers", "is_distilled", "krea2_lite"):
                if key in index:
                    components.setdefault("pipeline", {})[key] = index[key]
        write_manifest(tmp, {
            "library_version": __version__,
            "source": {"path": str(src), "layout": source.layout, "format": source.format,
                       "files": [{"name": f.name, "bytes": f.stat().st_size} for f in source_files]},
            "config": model.config.to_dict(),
            "quant": {**spec.to_dict(), "modules": model.quantization.modules, "kept": model.quantization.kept},
            "variant": variant,
            "components": components,
        })
        quantize_output.install(tmp, out, args.force)  # --force: replaces only an earlier output of ours
    if not args.quiet:
        print(f"wrote {out} ({folder_size(out) / 1e9:.2f} GB, from {source_bytes / 1e9:.2f} GB) "
              f"in {time.time() - started:.0f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_cli(lambda: print(quantize_to_folder(args)))  # one `error: …` line, exit 2 (error_contract.py)
