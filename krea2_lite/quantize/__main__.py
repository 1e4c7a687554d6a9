"""`python -m krea2_lite.quantize --model SRC --dtype {int8,fp8,int4} --out DIR
[--activations {int8,fp8} [--rotate [BLOCK]]] [--lowrank R]`.

Writes a self-contained quantized folder (see `format.py`). The work happens in a temporary
folder beside DIR that is renamed into place at the end, so DIR is either absent, the previous
DIR (with --force) or complete — never half-written. SRC is only read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import open_checkpoint, resolve_path
from ..errors import Krea2LiteError
from .format import folder_size, write_manifest, write_transformer
from .recipe import DEFAULT_INCLUDE, DEFAULT_ROTATE, GROUP_SIZES, ROTATE_SIZES, QuantSpec, require_rank

PARTIAL_MARK = ".partial-"
BYTES_PER_WEIGHT = {"int8": 1.0, "fp8": 1.0, "int4": 0.5}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m krea2_lite.quantize",
                                description="Quantize a Krea 2 checkpoint into a self-contained folder")
    p.add_argument("--model", required=True, help="transformer .safetensors, diffusers transformer/ or pipeline folder")
    p.add_argument("--dtype", required=True, choices=["int8", "fp8", "int4"])
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES, help="int4 group length")
    p.add_argument("--activations", choices=["none", "int8", "fp8"], default="none",
                   help="W8A8: also quantize each layer's input per token at run time (same type as --dtype)")
    p.add_argument("--rotate", type=int, nargs="?", const=DEFAULT_ROTATE, default=0,
                   choices=[r for r in ROTATE_SIZES if r], metavar="BLOCK",
                   help=f"W8A8 only: store weights as W·H (block Hadamard, default block {DEFAULT_ROTATE}) and "
                        "rotate activations before quantizing them (spreads outlier channels)")
    p.add_argument("--lowrank", type=int, default=None, metavar="R",
                   help="int4 only: give each quantized layer a bf16 rank-R correction U·V (int4 stores W − U·V); "
                        "R from 1 to the smallest layer's min(in, out), 32 is the usual choice")
    p.add_argument("--text-encoder-dtype", choices=["int8", "int4", "none"], default="int8",
                   help="for a pipeline source: quantize the Qwen3-VL text path (none = keep bf16)")
    p.add_argument("--include", nargs="*", default=list(DEFAULT_INCLUDE), help="module-name globs to quantize")
    p.add_argument("--exclude", nargs="*", default=[], help="module-name globs to keep in bf16")
    p.add_argument("--variant", choices=["raw", "turbo"], help="record the variant in the manifest")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Temporary folders left by a killed run (their process is gone) are removed."""
    for path in out.parent.glob(f".{out.name}{PARTIAL_MARK}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def estimate_bytes(source_bytes: int, dtype: str) -> int:
    """Upper estimate of the output: the block weights shrink to 1 (or 0.5) byte per weight
    plus scales; the rest stays bf16. Half the bf16 source + 5% is safe for all three types."""
    return int(source_bytes * (BYTES_PER_WEIGHT[dtype] / 2) * 1.05) + (64 << 20)


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


def quantize_pipeline_parts(root: Path, tmp: Path, te_dtype: str, progress: bool) -> dict:
    """Copy or quantize the other components of a pipeline source into `tmp`."""
    components = {}
    if (root / "text_encoder").is_dir():
        from ..model.text_encoder import load_text_encoder
        from .text_encoder import save_text_encoder

        encoder = load_text_encoder(root / "text_encoder", device="cpu", dtype=torch.bfloat16,
                                    quant=None if te_dtype == "none" else te_dtype)
        save_text_encoder(encoder, tmp / "text_encoder")
        components["text_encoder"] = {"path": "text_encoder", "dtype": te_dtype if te_dtype != "none" else "bf16"}
        del encoder
    for name in ("vae", "scheduler"):
        if (root / name).is_dir():
            shutil.copytree(root / name, tmp / name)
            components[name] = {"path": name}
    return components


def run(args: argparse.Namespace) -> Path:
    src = resolve_path(args.model)
    out = Path(args.out).expanduser().resolve()
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if out == src.resolve() or src.resolve() in out.parents:
        raise ValueError(f"--out {out} must not be inside --model {src}")
    lowrank = 0 if args.lowrank is None else require_rank(args.lowrank, "--lowrank")
    if lowrank and args.dtype != "int4":
        raise ValueError(f"--lowrank needs --dtype int4, got --dtype {args.dtype}")
    spec = QuantSpec(args.dtype, args.group_size, tuple(args.include), tuple(args.exclude),
                     activations=None if args.activations == "none" else args.activations, rotate=args.rotate,
                     lowrank=lowrank)
    transformer_path, root = source_layout(src)
    source = open_checkpoint(transformer_path)
    source_files = sorted({file for file, _, _ in source.entries.values()})
    source_bytes = sum(f.stat().st_size for f in source_files)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    check_free_space(out, estimate_bytes(source_bytes, args.dtype) + (source_bytes // 3 if root else 0))

    tmp = out.parent / f".{out.name}{PARTIAL_MARK}{os.getpid()}"
    tmp.mkdir()
    started = time.time()
    try:
        from ..checkpoint import load_transformer

        model = load_transformer(transformer_path, device="cpu", dtype=torch.bfloat16, quant=spec,
                                 progress=not args.quiet)
        write_transformer(model, tmp)
        components = {"transformer": {"path": "transformer", "dtype": spec.name if spec.lowrank else args.dtype}}
        variant = args.variant
        if root is not None:
            components.update(quantize_pipeline_parts(root, tmp, args.text_encoder_dtype, not args.quiet))
            index = json.loads((root / "model_index.json").read_text())
            if variant is None and "is_distilled" in index:
                variant = "turbo" if index["is_distilled"] else "raw"
            for key in ("text_encoder_select_layers", "is_distilled"):
                if key in index:
                    components.setdefault("pipeline", {})[key] = index[key]
        write_manifest(tmp, {
            "library_version": __version__,
            "source": {"path": str(src), "layout": source.layout,
                       "files": [{"name": f.name, "bytes": f.stat().st_size} for f in source_files]},
            "config": model.config.to_dict(),
            "quant": {**spec.to_dict(), "modules": model.quantization.modules, "kept": model.quantization.kept},
            "variant": variant,
            "components": components,
        })
        if out.exists():  # --force: swap in the new folder, then drop the old one
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not args.quiet:
        print(f"wrote {out} ({folder_size(out) / 1e9:.2f} GB, from {source_bytes / 1e9:.2f} GB) "
              f"in {time.time() - started:.0f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        print(run(args))
    except (Krea2LiteError, ValueError, OSError) as exc:
        if os.environ.get("KREA2_LITE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
