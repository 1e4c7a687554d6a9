"""Ray batch and service throughput on the CPU demo model (64×64, fp32, a local Ray instance).

  batch    images per minute of `krea2_lite.batch.generate` with 1 and 2 workers (each worker one
           CPU and one torch thread): end to end (Ray job start, pipeline loads, every image) and
           steady (images / the summed per-image seconds of each worker, summed over workers).
  service  per-request latency of `--concurrency` simultaneous POST /v1/images with the same settings,
           with batching off (max batch 1) and on (max batch = concurrency), and the requests per minute.
Systems are alternated and the minimum over `--repeats` is reported (CPU timings here are bimodal).

  python -m benchmarks.ray_throughput --prompts 16 --steps 20 --repeats 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import tempfile
import time
import urllib.request
from pathlib import Path


def batch_run(prompts: Path, workers: int, steps: int) -> dict:
    from krea2_lite.batch import generate

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = generate(prompts, out, model="demo", steps=steps, workers=workers, progress=False)
        wall = time.perf_counter() - start
        entries = [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines()]
    busy = {}
    for e in entries:
        busy.setdefault(e["worker"], []).append(e["seconds"])
    steady = sum(60 * len(s) / sum(s) for s in busy.values())
    return dict(images=summary["generated"], end_to_end=60 * summary["generated"] / wall, steady=steady)


def post(url: str, body: dict) -> float:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.status == 200
        response.read()
    return time.perf_counter() - start


def service_run(port: int, batch: int, concurrency: int, steps: int) -> dict:
    from ray import serve

    from krea2_lite.serve.app import build_app
    from krea2_lite.serve.config import ServeConfig

    serve.run(build_app(ServeConfig(model="demo", port=port, max_batch_size=batch, batch_wait_s=0.05,
                                    max_queue=4 * concurrency)), name="krea2_lite", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/images"
    post(url, {"prompt": "warm up", "steps": steps})
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda i: post(url, {"prompt": f"a red circle {i}", "seed": i, "steps": steps}),
                                  range(concurrency)))
    wall = time.perf_counter() - start
    return dict(mean=sum(latencies) / len(latencies), worst=max(latencies), per_minute=60 * concurrency / wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", choices=["batch", "service"])
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    if args.skip != "batch":
        with tempfile.TemporaryDirectory() as folder:
            prompts = Path(folder) / "bench.txt"
            prompts.write_text("".join(f"shape number {i}\n" for i in range(args.prompts)))
            best = {}
            for _ in range(args.repeats):
                for workers in (1, 2):
                    r = batch_run(prompts, workers, args.steps)
                    old = best.get(workers)
                    best[workers] = r if old is None or r["end_to_end"] > old["end_to_end"] else old
        for workers, r in best.items():
            rows.append(f"| batch, {workers} worker(s) | {r['images']} images | {r['end_to_end']:.1f} images/min end "
                        f"to end | {r['steady']:.1f} images/min steady |")
        rows.append(f"| batch ratio 2/1 | | {best[2]['end_to_end'] / best[1]['end_to_end']:.2f}× | "
                    f"{best[2]['steady'] / best[1]['steady']:.2f}× |")
    if args.skip != "service":
        from ray import serve

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        best = {}
        for _ in range(args.repeats):
            for batch in (1, args.concurrency):
                r = service_run(port, batch, args.concurrency, args.steps)
                old = best.get(batch)
                best[batch] = r if old is None or r["mean"] < old["mean"] else old
        serve.shutdown()
        for batch, r in best.items():
            rows.append(f"| service, max batch {batch}, {args.concurrency} concurrent | mean {r['mean']:.2f} s | "
                        f"worst {r['worst']:.2f} s | {r['per_minute']:.1f} requests/min |")
    ray.shutdown()
    print(f"device cpu (local Ray, num_cpus=2), demo model fp32, 64x64, {args.steps} steps, "
          f"min over {args.repeats} alternated repeats")
    print("| system | | | |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
