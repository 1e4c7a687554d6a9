"""Quantization at full width, on random weights (they cost what real ones cost):

  error   relative L2 error of one full-width (6144) Krea 2 block's output per dtype vs fp32
  memory  peak RSS of `python -m krea2_lite.quantize` on a synthetic bf16 checkpoint with the
          released widths and --layers blocks, and the projection to the 28-block model

  python benchmarks/quantize.py --what error memory --layers 4
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from krea2_lite import Krea2Config, Krea2Transformer  # noqa: E402
from krea2_lite.model.transformer import SingleStreamBlock  # noqa: E402
from krea2_lite.quantize import QuantizedLinear  # noqa: E402


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


def memory(layers: int, dtype: str) -> dict:
    cfg = Krea2Config.krea2().replace(layers=layers)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        src = Path(tmp) / "synthetic.safetensors"
        writer = ("import torch; from krea2_lite import Krea2Config, Krea2Transformer; "
                  "from safetensors.torch import save_file; "
                  f"cfg = Krea2Config.from_dict({cfg.to_dict()!r}); "
                  "m = Krea2Transformer(cfg).to(torch.bfloat16); "
                  f"save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, {str(src)!r})")
        subprocess.run([sys.executable, "-c", writer], check=True)
        # The quantizer runs in its own process that reports its own peak (RUSAGE_CHILDREN would
        # also count the writer above, which holds the whole synthetic model).
        runner = ("import resource, runpy, sys\n"
                  "sys.argv = ['krea2_lite.quantize'] + sys.argv[1:]\n"
                  "try:\n    runpy.run_module('krea2_lite.quantize', run_name='__main__')\n"
                  "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
                  "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
        started = time.time()
        proc = subprocess.run([sys.executable, "-c", runner, "--model", str(src), "--dtype", dtype,
                               "--out", str(Path(tmp) / "out"), "--quiet"], check=True, capture_output=True, text=True)
        peak = int(proc.stdout.split()[-1])
        seconds = time.time() - started
        out_bytes = sum(f.stat().st_size for f in (Path(tmp) / "out").rglob("*") if f.is_file())
        src_bytes = src.stat().st_size
    block_params = cfg.replace(layers=2).num_parameters() - cfg.replace(layers=1).num_parameters()
    block_quantized = block_params * {"int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / 128}[dtype]
    missing_blocks = Krea2Config.krea2().layers - layers  # the released model has 28
    row = dict(dtype=dtype, layers=layers, source_gb=round(src_bytes / 1e9, 2), output_gb=round(out_bytes / 1e9, 2),
               peak_rss_gb=round(peak / 1e9, 2), seconds=round(seconds, 1),
               block_bf16_gb=round(block_params * 2 / 1e9, 3),
               projected_output_gb_28_blocks=round((out_bytes + missing_blocks * block_quantized) / 1e9, 2),
               projected_peak_rss_gb_28_blocks=round((peak + missing_blocks * block_quantized) / 1e9, 2))
    print(row, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", nargs="+", choices=["error", "memory"], default=["error", "memory"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="int8", choices=["int8", "fp8", "int4"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    if "error" in args.what:
        rows += block_error(args.tokens, 0)
        rows += block_error(args.tokens, 8)
    if "memory" in args.what:
        rows.append(memory(args.layers, args.dtype))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
