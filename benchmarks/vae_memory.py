"""Peak memory and time of the Qwen-Image VAE decoder (krea2_lite.model.vae), tiled vs untiled.

The decoder is built at the released shape (diffusers ``AutoencoderKLQwenImage`` defaults: base_dim 96,
z_dim 16, dim_mult [1, 2, 4, 4], num_res_blocks 2) with random weights; nothing is downloaded.
Each case runs in a fresh subprocess so its peak is its own:

* CPU: peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of the process, and
  the same minus the RSS just before the decode (weights, latents and the interpreter excluded);
* CUDA: ``torch.cuda.max_memory_allocated`` during the decode, and that minus what was allocated
  before it (weights + latents); the decode is run once to warm up, then timed.

Usage::

    python -m benchmarks.vae_memory                       # 1024x1024, fp32 + bf16, untiled + tiled
    python -m benchmarks.vae_memory --devices cpu --dtypes fp32 --json vae_cpu.json
    python -m benchmarks.vae_memory --size 2048 --tile 64 --overlap 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def worker(case: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import resource

    import torch

    from benchmarks.common import time_ms
    from krea2_lite.model.vae import QwenImageVAEConfig, QwenImageVAEDecoder

    dtype = getattr(torch, DTYPES[case["dtype"]])
    device = torch.device(case["device"])
    torch.manual_seed(0)
    model = QwenImageVAEDecoder(QwenImageVAEConfig(), dtype=dtype).to(device).eval().requires_grad_(False)
    cl = case["channels_last"]
    if cl == "on" or (cl == "auto" and device.type == "cpu" and dtype != torch.float32):
        model.use_channels_last()  # what load_vae_decoder does for half precision on CPU
        out_cl = True
    else:
        out_cl = False
    with torch.no_grad():  # non-trivial norm gains, like a trained model's
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    lat = case["latent"]
    latents = torch.randn(1, 16, lat, lat, device=device, dtype=dtype)
    tile = case["tile"]
    kw = dict(tile=tile, tile_overlap=case["overlap"]) if tile else {}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {**case, "weights_mib": weights / 2**20, "threads": torch.get_num_threads(), "nhwc": out_cl}

    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        model.decode(latents, **kw)  # warm-up (cuDNN autotune, allocator)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = [ms / 1e3 for ms in time_ms(lambda: model.decode(latents, **kw), device, case["repeats"])]
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["decode_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        out["seconds"] = sorted(times)[len(times) // 2]
    else:
        out["device_name"] = f"{_cpu_name()} ({os.cpu_count()} cores)"
        base = _rss_bytes()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        img = model.decode(latents, **kw)
        out["seconds"] = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_mib"] = peak / 2**20
        out["decode_peak_mib"] = (peak - base) / 2**20
        out["peak_before_decode_mib"] = peak_before / 2**20
        del img
    out["finite"] = True
    return out


def _table(rows: list[dict]) -> str:
    lines = []
    for dev in dict.fromkeys(r["device_name"] for r in rows):
        lines.append(f"\n**{dev}**\n")
        lines.append("| image | dtype | decode | peak memory (MiB) | decode peak above weights+inputs (MiB) | time (s) |")
        lines.append("|---|---|---|---:|---:|---:|")
        for r in rows:
            if r["device_name"] != dev:
                continue
            px = r["latent"] * 8
            mode = f"tiled {r['tile']}/{r['overlap']} lat" if r["tile"] else "untiled"
            mode += " NHWC" if r.get("nhwc") else ""
            if "error" in r:
                lines.append(f"| {px}x{px} | {r['dtype']} | {mode} | failed: {r['error']} | | |")
                continue
            kind = "max_allocated" if r["device"].startswith("cuda") else "max RSS"
            lines.append(f"| {px}x{px} | {r['dtype']} | {mode} | {r['peak_mib']:.0f} ({kind}) | "
                         f"{r['decode_peak_mib']:.0f} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when unavailable")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--modes", default="untiled,tiled", help="comma list of untiled, tiled")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--tile", type=int, default=64, help="latent tile size for the tiled case")
    ap.add_argument("--overlap", type=int, default=16, help="latent tile overlap for the tiled case")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                    help="NHWC conv kernels; auto = on for half precision on CPU (as load_vae_decoder)")
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per CUDA case (median)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    devices = [d for d in args.devices.split(",") if d]
    if "cuda" in devices and not torch.cuda.is_available():
        print("cuda: not available, skipped", file=sys.stderr)
        devices.remove("cuda")
    rows = []
    for device in devices:
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                case = {"device": device, "dtype": dtype, "latent": args.size // 8,
                        "tile": args.tile if mode == "tiled" else None, "overlap": args.overlap,
                        "repeats": args.repeats, "channels_last": args.channels_last}
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run([sys.executable, "-m", "benchmarks.vae_memory", "--worker", json.dumps(case)],
                                          capture_output=True, text=True, timeout=args.timeout, cwd=ROOT,
                                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                              [str(ROOT), os.environ.get("PYTHONPATH", "")])})
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode or not lines:
                        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                        row = {**case, "error": f"rc={proc.returncode}: {tail}"}
                    else:
                        row = json.loads(lines[-1][7:])
                except subprocess.TimeoutExpired:
                    row = {**case, "error": f"timeout after {args.timeout:.0f}s"}
                row.setdefault("device_name", device)
                print(f"{device} {dtype} {mode}: "
                      + (row.get("error") or f"peak {row['peak_mib']:.0f} MiB, {row['seconds']:.2f} s")
                      + f" (case wall {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
                rows.append(row)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
