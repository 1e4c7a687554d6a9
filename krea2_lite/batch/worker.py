"""The Ray Data callable class: one Krea2Pipeline per worker, built once, fed one job per call.

Each worker plans its own memory (`from_pretrained(offload="auto", vram_gb=…)` on the GPU Ray gave
it), writes each PNG atomically to the job's storage and returns the manifest records; it never
writes the manifest itself (the driver does, once per image).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import numpy as np

from .storage import Storage, sha256


class GenerateJobs:
    """`__init__` loads the pipeline; `__call__({"work": [json, …]})` → `{"records": [json, …]}`."""

    def __init__(self, load: dict, options: dict, storage: Storage):
        import torch

        from ..pipeline import Krea2Pipeline

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[load["dtype"]]
        self.pipe = Krea2Pipeline.from_pretrained(
            load["model"], variant=load.get("variant"), dtype=dtype, quant=_quant(load.get("quant")),
            text_encoder=load.get("text_encoder"), vae=load.get("vae"), transformer=load.get("transformer"),
            revision=load.get("revision"), progress=False, **options)
        for path, scale in load.get("loras", []):
            self.pipe.load_lora(path, scale=scale, name=path)  # as the CLI names them
        self.storage = storage
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        return {"records": np.array([json.dumps(self.run(json.loads(str(w)))) for w in batch["work"]], dtype=object)}

    def run(self, work: dict) -> list[dict]:
        """One pipeline call for one job; its images written; their manifest records returned."""
        job = work["job"]
        start = time.perf_counter()
        extra = {"max_sequence_length": job["max_sequence_length"]} if job.get("max_sequence_length") else {}
        result = self.pipe(job["prompt"], negative_prompt=job["negative_prompt"], width=job["width"],
                           height=job["height"], steps=job["steps"], guidance=job["guidance"], mu=job["mu"],
                           seed=job["seed"], num_images=job["num_images"], cache=job.get("cache"),
                           progress=False, **extra, **images_in_kwargs(job))
        seconds = (time.perf_counter() - start) / len(result.images)
        records = []
        for image, meta, planned in zip(result.images, result.metadata, work["images"]):
            data = png_bytes(image, meta if planned["request"]["metadata"] else None)
            self.storage.write(planned["file"], data)
            records.append(dict(index=planned["index"], line=planned["line"], prompt=meta["prompt"], seed=meta["seed"],
                                settings=meta, request=planned["request"], file=planned["file"], sha256=sha256(data),
                                seconds=round(seconds, 3), worker=self.worker))
        return records


def images_in_kwargs(job: dict) -> dict:
    """The pipeline's images-in keywords of a planned job (`jobs.plan_images` records the input files
    as {path, sha256}; JSON turned the outpaint tuple into a list)."""
    if job.get("strength") is None and job.get("input_image") is None:
        return {}
    outpaint = job.get("outpaint")
    return dict(image=(job.get("input_image") or {}).get("path"), mask_image=(job.get("input_mask") or {}).get("path"),
                strength=job.get("strength"), mask_blur=job.get("mask_blur") or 0,
                outpaint=tuple(outpaint) if outpaint is not None else None)


def png_bytes(image, metadata: dict | None) -> bytes:
    """The exact bytes `save_png` writes for the single-process CLI."""
    from ..metadata import save_png

    with tempfile.TemporaryDirectory(prefix="krea2_lite_png_") as folder:
        path = save_png(image, os.path.join(folder, "image.png"), metadata)
        with open(path, "rb") as fh:
            return fh.read()


def _quant(value):
    if isinstance(value, dict):
        from ..quantize import QuantSpec

        return QuantSpec.from_dict(value)
    return value
