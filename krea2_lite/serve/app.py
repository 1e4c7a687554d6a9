"""The Ray Serve deployment: one Krea2Pipeline per replica behind `POST /v1/images`.

Requests that arrive within `batch_wait_s` of each other and share settings (batch_key) run as one
pipeline call with each request's own noise (seed + i, drawn as the pipeline draws it). Batched
calls change the floating-point summation order, so an image made in a batch may differ from the
same request made alone by about one intensity level in a few pixels; `--max-batch-size 1` makes
every image bit-identical to the library's single call.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from pathlib import Path

from ray import serve

from .config import ServeConfig, token_hash
from .requests import ImageRequest, RequestError, parse_body


def _json(status: int, payload: dict, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict | None = None):
    kind = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
            503: "server_busy"}.get(status, "server_error")
    return _json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)


class ImageService:
    """Routes: POST /v1/images, GET /v1/health, GET /v1/models. One pipeline call at a time."""

    def __init__(self, config: ServeConfig):
        import torch

        from ..pipeline import Krea2Pipeline

        self.config = config
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            config.dtype or ("fp32" if config.model == "demo" else "bf16")]
        self.pipe = Krea2Pipeline.from_pretrained(config.model, quant=config.quant, dtype=dtype, progress=False,
                                                  offload=config.offload, vram_gb=config.vram_gb)
        self.lora_dir = Path(config.lora_dir).resolve() if config.lora_dir else None
        self.accepted = 0  # requests admitted and not yet answered (waiting or running)
        self.seconds_per_image = 1.0
        self.generate.set_max_batch_size(config.max_batch_size)
        self.generate.set_batch_wait_timeout_s(config.batch_wait_s)

    async def __call__(self, request):
        if self.config.token_sha256 is not None and not self._authorized(request):
            return _error(401, "missing or wrong bearer token (send Authorization: Bearer <token>)",
                          {"WWW-Authenticate": "Bearer"})
        route = (request.method, request.url.path.rstrip("/"))
        if route == ("GET", "/v1/health"):
            return _json(200, {"status": "ok", "model": self.config.model, "queued": self.accepted})
        if route == ("GET", "/v1/models"):
            return _json(200, {"object": "list", "data": [{"id": self.config.model, "object": "model",
                                                           "owned_by": "krea2_lite", "quant": self.config.quant}]})
        if route == ("POST", "/v1/images"):
            return await self._images(request)
        return _error(404, f"no route {request.method} {request.url.path}; use POST /v1/images, GET /v1/health, "
                           "GET /v1/models")

    def _authorized(self, request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token_hash(token.strip()), self.config.token_sha256)

    async def _images(self, request):
        limit = self.config.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            return _error(413, f"the body is larger than {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            return _error(413, f"the body is larger than {limit} bytes")
        try:
            req = parse_body(body, model_id=self.config.model, lora_dir=self.lora_dir,
                             max_images=self.config.max_images)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        want_png = "image/png" in request.headers.get("accept", "")
        if want_png and req.num_images != 1:
            return _error(400, "Accept: image/png returns one image; ask for num_images 1, or accept JSON")
        if self.accepted >= self.config.max_queue:
            wait = max(1, round(self.seconds_per_image * self.accepted / self.config.max_batch_size))
            return _error(503, f"the queue is full ({self.accepted} requests); retry after {wait} s",
                          {"Retry-After": str(wait)})
        self.accepted += 1
        try:
            result = await self.generate(req)
        finally:
            self.accepted -= 1
        result, batched = result
        if isinstance(result, RequestError):
            return _error(result.status, str(result))
        headers = {"X-Krea2-Batch": str(batched)}  # requests in the pipeline call that made these images
        if want_png:
            from starlette.responses import Response

            return Response(result[0], media_type="image/png", headers=headers)
        return _json(200, {"created": int(time.time()),
                           "data": [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": req.seed + i}
                                    for i, png in enumerate(result)]}, headers)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)  # both set from the config in __init__
    async def generate(self, requests: list[ImageRequest]) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._run_batch, requests)

    def _run_batch(self, requests: list[ImageRequest]) -> list:
        """One pipeline call per group of equal settings; per request (its PNGs or a RequestError, the
        number of requests in its call)."""
        from .generation import run_group

        results = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.batch_key(), []).append(i)
        for members in groups.values():
            start = time.perf_counter()
            out = run_group(self.pipe, [requests[i] for i in members])
            for i, item in zip(members, out):
                results[i] = (item, len(members))
            images = sum(requests[i].num_images for i in members)
            self.seconds_per_image = (time.perf_counter() - start) / images
        return results


def build_app(config: ServeConfig):
    """The Serve application: `replicas` copies of ImageService, each admitting `max_queue` requests."""
    gpus = config.gpus_per_replica
    if gpus is None:
        import ray

        gpus = 1 if ray.cluster_resources().get("GPU") else 0
    deployment = serve.deployment(ImageService, name="krea2_lite").options(
        num_replicas=config.replicas, max_ongoing_requests=config.max_queue + 8,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": gpus})
    return deployment.bind(config)
