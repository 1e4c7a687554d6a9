"""One pipeline call for a group of requests with equal settings (serve.requests.batch_key)."""

from __future__ import annotations

import torch

from ..batch.worker import png_bytes
from ..cli.error_contract import USER_ERRORS, describe
from .requests import ImageRequest, RequestError


def run_group(pipe, requests: list[ImageRequest]) -> list:
    """Per request: its PNGs (bytes, with the CLI's metadata) or a RequestError(400) naming the cause.
    Each request's noise is drawn exactly as `pipe(prompt, seed=…)` draws it, so a request alone in its
    group gets the library's image bit for bit."""
    first = requests[0]
    width = first.width or pipe.default_size[0]
    height = first.height or pipe.default_size[1]
    try:
        noise = torch.cat([pipe.noise(r.num_images, height, width, r.seed) for r in requests])
        for name, path, scale in first.loras:
            pipe.load_lora(path, scale=scale, name=name)
        try:
            out = pipe([r.prompt for r in requests], negative_prompt=first.negative_prompt, width=width,
                       height=height, steps=first.steps, guidance=first.guidance, num_images=first.num_images,
                       latents=noise, progress=False)
        finally:
            for name, _, _ in first.loras:
                pipe.unload_lora(name)
    except USER_ERRORS as exc:
        return [RequestError(400, describe(exc))] * len(requests)
    results, k = [], 0
    for req in requests:
        pngs = []
        for i in range(req.num_images):
            meta = dict(out.metadata[k], seed=req.seed + i)  # the noise came from seed + i
            pngs.append(png_bytes(out.images[k], meta))
            k += 1
        results.append(pngs)
    return results
