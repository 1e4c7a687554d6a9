"""Quantization at full width, on random weights (they cost what real ones cost):

  error   relative L2 error of one full-width (6144) Krea 2 block's output per dtype vs fp32
  memory  peak RSS and wall time of `python -m krea2_lite.quantize` on a synthetic bf16 checkpoint
          with the released widths and exact official key names, for each of --layers blocks and
          each --dtype (the checkpoint is written block by block, so even 28 blocks need little RAM)
  load    peak RSS of `load_transformer(..., quant=)` on the CPU for the same kind of checkpoint,
          beside the loaded model's own bytes

  python -m benchmarks.bench_quantize --what memory --layers 2 6 --dtype int8 int4
  python -m benchmarks.bench_quantize --what load --layers 4 --dtype int8
  python -m benchmarks.bench_quantize --what memory --layers 28 --dtype int8   # ≈26 GB on disk, deleted after
  python -m benchmarks.bench_quantize --what memory --layers 2 --dtype int4-minmax int4 int4-lr32

--dtype names: int8, fp8, int4 (the default mse-clip rounding), int4-minmax (`--rounding minmax`),
int4-lrR (`--lowrank R`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import torch

from krea2_lite import Krea2Config, Krea2Transformer
from krea2_lite.model.transformer import SingleStreamBlock
from krea2_lite.quantize import QuantizedLinear


def random_(module: torch.nn.Module, std: float = 0.02) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, 0.1 if name.endswith((".scale", ".lin")) else std)


def block_error(tokens: int, outlier_channels: int) -> list[dict]:
    cfg = Krea2Config.krea2()
    torch.manual_seed(0)
    block = SingleStreamBlock(cfg).eval()
    random_(block)
    x = torch.randn(1, tokens, cfg.features)
    if outlier_channels:
        x[..., torch.randperm(cfg.features)[:outlier_channels]] *= 20  # activation outliers, as LLM/DiT blocks have
    vec = torch.randn(1, 1, 6 * cfg.features) * 0.1
    angles = torch.rand(1, tokens, cfg.headdim // 2)
    rope = (torch.cos(angles), torch.sin(angles))
    with torch.no_grad():
        reference = block(x, vec, rope)
    rows = []
    for dtype in ("int8", "fp8", "int4"):
        q = SingleStreamBlock(cfg).eval()
        q.load_state_dict(block.state_dict())
        for name, module in list(q.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent, _, leaf = name.rpartition(".")
                setattr(q.get_submodule(parent), leaf, QuantizedLinear.from_linear(
                    module, dtype, 128 if dtype == "int4" else None, torch.float32))
        with torch.no_grad():
            out = q(x, vec, rope)
        delta = (out - x) - (reference - x)  # error of what the block adds to the residual stream
        rows.append(dict(dtype=dtype, tokens=tokens, outlier_channels=outlier_channels,
                         rel_error_output=round(((out - reference).norm() / reference.norm()).item(), 5),
                         rel_error_update=round((delta.norm() / (reference - x).norm()).item(), 5)))
        print(rows[-1], flush=True)
        del q
    return rows


def write_synthetic(cfg: Krea2Config, path: Path) -> None:
    """A bf16 official-layout checkpoint of shape `cfg` with random weights, written tensor by tensor
    (krea2_lite's shard writer as one file) so the writer never holds more than one tensor."""
    script = f"""
import torch
from pathlib import Path
from krea2_lite import Krea2Config, Krea2Transformer
from krea2_lite.files.shard_writer import ShardedWriter
cfg = Krea2Config.from_dict({cfg.to_dict()!r})
with torch.device("meta"):
    model = Krea2Transformer(cfg)
layout = [(k, torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()]
writer = ShardedWriter(Path({str(path.parent)!r}), {path.stem!r}, layout, 1 << 62)
gen = torch.Generator().manual_seed(0)
for key, _, shape in layout:
    scale = 0.1 if key.endswith(('.scale', '.lin')) else 0.02
    writer.write(key, (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16))
writer.close()
"""
    subprocess.run([sys.executable, "-c", script], check=True)


# Runs a module as `python -m` would, then prints its own peak RSS (RUSAGE_CHILDREN would also count
# other children of this benchmark).
RUNNER = ("import resource, runpy, sys\n"
          "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
          "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
          "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")

LOADER = ("import resource, sys, torch\n"
          "from krea2_lite import load_transformer\n"
          "model = load_transformer(sys.argv[1], dtype=torch.bfloat16, quant=sys.argv[2], progress=False)\n"
          "held = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))\n"
          "print(held, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")

IMPORTS = ("import resource, torch, optimum.quanto, krea2_lite.cli.quantize\n"
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")


def baseline_rss() -> int:
    """Peak RSS of a process that only imports what the quantizer imports."""
    return int(subprocess.run([sys.executable, "-c", IMPORTS], check=True, capture_output=True,
                              text=True).stdout.split()[-1])


def cli_quant_args(name: str) -> list[str]:
    """The quantize CLI's flags for a --dtype name of this benchmark."""
    if name == "int4-minmax":
        return ["--dtype", "int4", "--rounding", "minmax"]
    if name.startswith("int4-lr"):
        return ["--dtype", "int4", "--lowrank", name.removeprefix("int4-lr")]
    return ["--dtype", name]


def quant_name(text: str) -> str:
    if text in ("int8", "fp8", "int4", "int4-minmax") or (text.startswith("int4-lr") and text[7:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected int8, fp8, int4, int4-minmax or int4-lrR, got {text!r}")


def memory(layers: int, dtype: str, shard: str) -> dict:
    cfg = Krea2Config.krea2().replace(layers=layers)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        src = Path(tmp) / "synthetic.safetensors"
        started = time.time()
        write_synthetic(cfg, src)
        write_seconds = time.time() - started
        started = time.time()
        proc = subprocess.run([sys.executable, "-c", RUNNER, "krea2_lite.quantize", "--model", str(src),
                               *cli_quant_args(dtype), "--out", str(Path(tmp) / "out"), "--quiet",
                               "--max-shard-size", shard], check=True, capture_output=True, text=True)
        seconds = time.time() - started
        peak = int(proc.stdout.split()[-1])
        out_files = [f for f in (Path(tmp) / "out").rglob("*") if f.is_file()]
        out_bytes = sum(f.stat().st_size for f in out_files)
        shards = sum(f.name.endswith(".safetensors") for f in out_files)
        src_bytes = src.stat().st_size
    row = dict(what="quantize CLI", dtype=dtype, layers=layers, source_gb=round(src_bytes / 1e9, 2),
               output_gb=round(out_bytes / 1e9, 2), shards=shards, max_shard_size=shard,
               peak_rss_gb=round(peak / 1e9, 2), seconds=round(seconds, 1),
               synthetic_write_seconds=round(write_seconds, 1))
    print(row, flush=True)
    return row


def load(layers: int, dtype: str) -> dict:
    cfg = Krea2Config.krea2().replace(layers=layers)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        src = Path(tmp) / "synthetic.safetensors"
        write_synthetic(cfg, src)
        started = time.time()
        out = subprocess.run([sys.executable, "-c", LOADER, str(src), dtype], check=True, capture_output=True,
                             text=True).stdout.split()
        seconds = time.time() - started
        src_bytes = src.stat().st_size
    held, peak = map(int, out[-2:])
    block = (cfg.replace(layers=2).num_parameters() - cfg.replace(layers=1).num_parameters()) * 2
    row = dict(what="load_transformer(quant=) on CPU", dtype=dtype, layers=layers, source_gb=round(src_bytes / 1e9, 2),
               model_gb=round(held / 1e9, 2), peak_rss_gb=round(peak / 1e9, 2), seconds=round(seconds, 1),
               block_bf16_gb=round(block / 1e9, 3))
    print(row, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", nargs="+", choices=["error", "memory", "load"], default=["error", "memory"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--dtype", nargs="+", default=["int8", "int4"], type=quant_name)
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    if "error" in args.what:
        rows += block_error(args.tokens, 0)
        rows += block_error(args.tokens, 8)
    if "memory" in args.what or "load" in args.what:
        base = baseline_rss()
        rows.append(dict(what="imports only (torch, optimum-quanto, krea2_lite)", peak_rss_gb=round(base / 1e9, 2)))
        print(rows[-1], flush=True)
    for dtype in args.dtype:
        for layers in args.layers:
            if "memory" in args.what:
                rows.append(memory(layers, dtype, args.max_shard_size))
            if "load" in args.what:
                rows.append(load(layers, dtype))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
