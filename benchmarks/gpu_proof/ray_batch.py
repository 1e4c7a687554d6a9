"""GPU proof rows for Ray (issue 30): a batch job on one GPU worker equals the single-process images,
and its images per minute; time-boxed in a child process (Ray start-up can hang on a bare machine).

`run(ctx, rec, section)` is the GPU proof's "ray" section; it records "not measured: …" (a skipped
check) rather than failing when Ray is missing or the time left is too short.
  python -m benchmarks.gpu_proof.ray_batch --child OUT.json     # the child itself (what run starts)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

NEEDED_S = 120.0  # Ray start, one worker's model load, 8 demo images, the single-process reference
PROMPTS = ["a red circle", "a blue square", "a green triangle on the left", "a yellow circle at the top"]


def run(ctx, rec, section) -> None:
    device = ctx.device
    name = "ray/batch one GPU worker = single process"
    if getattr(device, "type", str(device)) != "cuda":
        print("ray: nothing to prove off a GPU (tests/distributed covers the CPU)", flush=True)
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        rec.skip_check(name, "not measured: ray is not installed (pip install -e '.[ray]')")
        return
    if not section.fits(NEEDED_S):
        rec.skip_check(name, "not measured: " + section.why_not(NEEDED_S))
        return
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ray.json"
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        try:
            subprocess.run([sys.executable, "-m", "benchmarks.gpu_proof.ray_batch", "--child", str(out)], env=env,
                           cwd=root, timeout=section.left(), check=False, capture_output=True)
        except subprocess.TimeoutExpired:
            rec.skip_check(name, f"not measured: the Ray child ran past {section.left():.0f} s")
            return
        if not out.exists():
            rec.skip_check(name, "not measured: the Ray child wrote no result")
            return
        result = json.loads(out.read_text())
    rec.check(name, lambda: (result["equal"], result["detail"]))
    rec.timing(kind="ray", case="demo 64², 8 images", system="krea2_lite.batch, 1 GPU worker", quant="-",
               ms=result.get("ms_per_image"), detail=f"{result.get('per_minute', 0):.1f} images/min steady")


def child(out: Path) -> None:
    import ray
    import torch

    from krea2_lite.batch import generate
    from krea2_lite.batch.worker import png_bytes
    from krea2_lite.pipeline import Krea2Pipeline

    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder) / "proof.txt"
        prompts.write_text("\n".join(PROMPTS * 2) + "\n")
        ray.init(num_gpus=1, num_cpus=2, include_dashboard=False, log_to_driver=False)
        generate(prompts, Path(folder) / "out", model="demo", steps=8, workers=1, gpus_per_worker=1,
                 progress=False)
        ray.shutdown()
        entries = [json.loads(l) for l in (Path(folder) / "out" / "manifest.jsonl").read_text().splitlines()]
        pipe = Krea2Pipeline.from_pretrained("demo", dtype=torch.float32, device="cuda", progress=False)
        same = 0
        for entry in entries:
            ref = pipe(entry["prompt"], seed=0, steps=8, progress=False)
            same += png_bytes(ref.images[0], ref.metadata[0]) == (Path(folder) / "out" / entry["file"]).read_bytes()
        seconds = sum(e["seconds"] for e in entries[1:]) / max(1, len(entries) - 1)  # the first pays warm-up
    out.write_text(json.dumps(dict(equal=same == len(entries), detail=f"{same}/{len(entries)} PNGs byte-identical",
                                   ms_per_image=round(1000 * seconds, 1), per_minute=60 / seconds)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]))
