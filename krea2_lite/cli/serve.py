"""`python -m krea2_lite serve --model M [--quant Q] [--host 127.0.0.1] [--port 8000] [--replicas N]
[--token-file F] [--lora-dir D] [--max-batch-size B] [--max-queue Q]`: start the Ray Serve app
(krea2_lite/serve/), block until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
import time


NAME = "serve"
HELP = "serve POST /v1/images over HTTP with Ray Serve (docs/ray.md)"


def add_arguments(srv: argparse.ArgumentParser) -> None:
    srv.add_argument("--model", required=True, help="as for generate (a folder, hub id, file, or demo)")
    srv.add_argument("--quant", help="quantize the transformer while loading (as for generate)")
    srv.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16; fp32 for the demo")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=int, default=1, help="pipelines serving at once (one per GPU)")
    srv.add_argument("--gpus-per-replica", type=float, help="default 1 when the cluster has GPUs, else 0")
    srv.add_argument("--vram-gb", type=float, help="device memory budget per replica for the offload planner")
    srv.add_argument("--token-file", help="file whose first line is the bearer token every request must send")
    srv.add_argument("--lora-dir", help="folder of LoRA .safetensors files requests may name (by file name)")
    srv.add_argument("--max-batch-size", type=int, default=4, help="requests with equal settings run as one "
                     "call, up to this many (1: every image bit-identical to a single library call)")
    srv.add_argument("--max-queue", type=int, default=16, help="requests a replica admits at once; more get "
                     "503 with Retry-After")
    srv.add_argument("--max-images", type=int, default=4, help="largest num_images a request may ask for")
    srv.add_argument("--ray", default="auto", metavar="auto|local|ADDRESS", help="the Ray cluster (as for generate)")


def config_from_args(args: argparse.Namespace):
    from ..serve.config import ServeConfig, is_loopback, read_token, token_hash

    if args.quant not in (None, "none"):
        from ..quantize import QuantSpec

        QuantSpec.parse(args.quant)  # a typo is one error line before Ray starts
    token = read_token(args.token_file) if args.token_file else None
    config = ServeConfig(model=args.model, quant=None if args.quant in (None, "none") else args.quant,
                         dtype=args.dtype, host=args.host, port=args.port, replicas=args.replicas,
                         token_sha256=token_hash(token) if token else None, lora_dir=args.lora_dir,
                         max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_images=args.max_images,
                         gpus_per_replica=args.gpus_per_replica, vram_gb=args.vram_gb).check()
    if token is None and not is_loopback(args.host):
        print(f"WARNING: serving on {args.host}:{args.port} WITHOUT A TOKEN: anyone who can reach this address "
              "can use this machine's GPU. Pass --token-file FILE, or bind 127.0.0.1.", file=sys.stderr, flush=True)
    return config


def run(args: argparse.Namespace) -> int:
    """Start Ray Serve with the app and block until Ctrl-C (exit 130 via cli/error_contract.py)."""
    from ray import serve as ray_serve

    from ..batch.run import connect
    from ..serve.app import build_app

    config = config_from_args(args)
    connect(args.ray)
    ray_serve.start(http_options={"host": config.host, "port": config.port})
    ray_serve.run(build_app(config), name="krea2_lite", route_prefix="/")
    print(f"serving {config.model} on http://{config.host}:{config.port}/v1/images (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        ray_serve.shutdown()
