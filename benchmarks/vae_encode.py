"""Time and peak memory of the Qwen-Image VAE encoder (krea2_lite.model.vae_encoder), tiled vs untiled.

Images in (img2img, inpainting, outpainting) encode the input once per call. The encoder is built at
the released shape (base_dim 96, z_dim 16, dim_mult [1, 2, 4, 4], num_res_blocks 2; 19.3M parameters
in 2D) with random weights; nothing is downloaded. Each case runs in a fresh subprocess so its peak
is its own:

* CPU: peak RSS (``ru_maxrss``) minus the RSS just before the encode (weights, image excluded); the
  time is the minimum over ``--repeats`` encodes (CPU timings here are bimodal: see PITFALLS);
* CUDA: ``torch.cuda.max_memory_allocated`` during the encode minus what was allocated before it,
  after one warm-up encode; the time is the median of ``--repeats``.

Usage::

    python -m benchmarks.vae_encode --devices cpu --dtypes fp32 --sizes 1024,2048 --json enc.json
    python -m benchmarks.vae_encode --devices cuda --dtypes bf16 --sizes 1024,2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _encoder(case: dict):
    import torch

    from krea2_lite.model.vae import QwenImageVAEConfig
    from krea2_lite.model.vae_encoder import QwenImageVAEEncoder

    dtype = getattr(torch, DTYPES[case["dtype"]])
    device = torch.device(case["device"])
    torch.manual_seed(0)
    model = QwenImageVAEEncoder(QwenImageVAEConfig(), dtype=dtype).to(device).eval().requires_grad_(False)
    if device.type == "cpu" and dtype != torch.float32:
        model.to(memory_format=torch.channels_last)  # what load_vae_encoder does for half precision on CPU
    with torch.no_grad():  # non-trivial norm gains, like a trained model's
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    image = torch.rand(1, 3, case["size"], case["size"], device=device, dtype=dtype) * 2 - 1
    return model, image


def worker(case: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import resource

    import torch

    model, image = _encoder(case)
    kw = dict(tile=case["tile"], tile_overlap=case["overlap"]) if case["tile"] else {}
    out = {**case, "threads": torch.get_num_threads()}
    times = []
    if image.device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(image.device)
        model.encode(image, **kw)  # warm-up (cuDNN autotune, allocator)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(case["repeats"]):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            z = model.encode(image, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del z
        out["encode_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["seconds"] = sorted(times)[len(times) // 2]
    else:
        out["device_name"] = f"CPU ({os.cpu_count()} cores)"
        base = _rss_bytes()
        for _ in range(case["repeats"]):
            t0 = time.perf_counter()
            z = model.encode(image, **kw)
            times.append(time.perf_counter() - t0)
            del z
        out["encode_peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20
        out["seconds"] = min(times)
    return out


def _table(rows: list[dict]) -> str:
    lines = ["| device | image | dtype | encode | peak above weights + input (MiB) | time (s) |",
             "|---|---|---|---|---:|---:|"]
    for r in rows:
        mode = f"tiled {r['tile']}/{r['overlap']} lat" if r["tile"] else "untiled"
        where = f"{r['size']}²"
        if "error" in r:
            lines.append(f"| {r.get('device_name', r['device'])} | {where} | {r['dtype']} | {mode} | "
                         f"not measured: {r['error']} | |")
            continue
        lines.append(f"| {r['device_name']} | {where} | {r['dtype']} | {mode} | {r['encode_peak_mib']:.0f} | "
                     f"{r['seconds']:.2f} |")
    return "\n".join(lines)


def run_case(case: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.vae_encode", "--worker", json.dumps(case)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            return {**case, "error": f"rc={proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"}
        return json.loads(lines[-1][7:])
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout:.0f}s"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when unavailable")
    ap.add_argument("--dtypes", default="fp32", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--sizes", default="1024,2048", help="comma list of image sides in pixels")
    ap.add_argument("--modes", default="untiled,tiled", help="comma list of untiled, tiled")
    ap.add_argument("--tile", type=int, default=64, help="latent tile side for the tiled case (64 = 512 px)")
    ap.add_argument("--overlap", type=int, default=16, help="latent tile overlap for the tiled case")
    ap.add_argument("--repeats", type=int, default=2, help="timed encodes per case")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    import torch

    devices = [d for d in args.devices.split(",") if d and (d != "cuda" or torch.cuda.is_available())]
    rows = []
    for device in devices:
        for dtype in args.dtypes.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                for mode in args.modes.split(","):
                    case = {"device": device, "dtype": dtype, "size": size, "repeats": args.repeats,
                            "tile": args.tile if mode == "tiled" else None, "overlap": args.overlap}
                    row = run_case(case, args.timeout)
                    print(f"{device} {dtype} {size} {mode}: " + (row.get("error") or
                          f"{row['encode_peak_mib']:.0f} MiB, {row['seconds']:.2f} s"), file=sys.stderr, flush=True)
                    rows.append(row)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
