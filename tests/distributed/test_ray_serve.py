"""`python -m krea2_lite serve` on a local Ray with the demo model, over loopback HTTP: images equal the
library's, every bad request gets its status and one line, and the service keeps serving."""

import base64
import concurrent.futures
import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from krea2_lite.batch.worker import png_bytes
from krea2_lite.metadata import METADATA_KEY
from krea2_lite.pipeline import Krea2Pipeline
from krea2_lite.serve.config import ServeConfig, token_hash

TOKEN = "test-token-0123456789abcdef"
MAX_QUEUE = 3


@pytest.fixture(scope="module")
def service(local_ray, lora_dir):
    from ray import serve

    from krea2_lite.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(model="demo", port=port, token_sha256=token_hash(TOKEN), lora_dir=str(lora_dir),
                         max_queue=MAX_QUEUE, max_batch_size=4, batch_wait_s=0.2, max_body_bytes=4096)
    serve.run(build_app(config), name="krea2_lite", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def write_demo_lora(path, features: int):
    """A rank-2 LoRA (krea-2 training layout) on the demo's first block's query projection."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"blocks.0.attn.wq.lora_A": torch.randn(2, features, generator=g) / features ** 0.5,
               "blocks.0.attn.wq.lora_B": torch.randn(features, 2, generator=g) * 0.5},
              str(path), metadata={"rank": "2", "lora_alpha": "2", "lora_scale": "1.0"})


@pytest.fixture(scope="module")
def library():
    return Krea2Pipeline.from_pretrained("demo", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def lora_dir(library, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_demo_lora(folder / "style.safetensors", library.transformer.config.features)
    return folder


def call(url, path, body=None, token=TOKEN, accept="application/json", raw=None):
    headers = {"Accept": accept, "Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def pixels(png: bytes):
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def library_png(pipe, prompt, seed, steps):
    out = pipe(prompt, seed=seed, steps=steps, progress=False)
    return png_bytes(out.images[0], out.metadata[0])


def test_images_equal_the_library_alone_and_batched(service, library):
    status, body, headers = call(service, "/v1/images", {"prompt": "a red circle", "seed": 3, "steps": 2},
                                 accept="image/png")
    assert status == 200 and headers["Content-Type"] == "image/png" and headers["X-Krea2-Batch"] == "1"
    assert body == library_png(library, "a red circle", 3, 2)  # alone: the same bytes (pixels and metadata)

    prompts = ["a blue square", "a green triangle", "a yellow circle"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda i: call(service, "/v1/images", {"prompt": prompts[i], "seed": 10 + i,
                                                                        "steps": 2}), range(len(prompts))))
    assert max(int(headers["X-Krea2-Batch"]) for _, _, headers in answers) >= 2  # they shared a call
    for i, (status, body, _) in enumerate(answers):
        assert status == 200
        reply = json.loads(body)
        assert set(reply) == {"created", "data"} and len(reply["data"]) == 1
        png = base64.b64decode(reply["data"][0]["b64_json"])
        expected = library_png(library, prompts[i], 10 + i, 2)
        # Batched calls sum in another order: at most one intensity level apart (docs/ray.md).
        assert np.abs(pixels(png) - pixels(expected)).max() <= 1
        assert Image.open(io.BytesIO(png)).text[METADATA_KEY] == Image.open(io.BytesIO(expected)).text[METADATA_KEY]


@pytest.mark.slow
def test_a_lora_by_name_gives_the_library_image_with_that_lora(service, library, lora_dir):
    body = {"prompt": "a red circle", "seed": 4, "steps": 2, "loras": [{"name": "style", "scale": 0.7}]}
    status, png, _ = call(service, "/v1/images", body, accept="image/png")
    assert status == 200
    library.load_lora(lora_dir / "style.safetensors", scale=0.7, name="style")
    try:
        expected = library_png(library, "a red circle", 4, 2)
    finally:
        library.unload_lora("style")
    assert png == expected and png != library_png(library, "a red circle", 4, 2)
    assert json.loads(Image.open(io.BytesIO(png)).text[METADATA_KEY])["loras"] == [{"name": "style", "scale": 0.7}]


def test_bad_requests_get_their_status_and_one_line(service):
    cases = [
        (dict(raw=b"{not json"), 400, "the body is not valid JSON"),
        (dict(body={"prompt": "x", "steps": 0}), 400, "steps must be in 1..1000, got 0"),
        (dict(body={"prompt": "x", "width": 5000}), 400, "width must be in 1..4096 pixels, got 5000"),
        (dict(body={"prompt": "x", "loras": [{"name": "../secret"}]}), 400, "LoRA name '../secret' must be"),
        (dict(body={"prompt": "x", "loras": [{"name": "missing"}]}), 400, "no LoRA named 'missing'"),
        (dict(body={"prompt": "x", "path": "/etc/passwd"}), 400, "unknown field 'path'"),
        (dict(body={"prompt": "x"}, token=None), 401, "missing or wrong bearer token"),
        (dict(body={"prompt": "x"}, token="wrong-token-0123456789"), 401, "missing or wrong bearer token"),
        (dict(body={"prompt": "x" * 5000}), 413, "the body is larger than 4096 bytes"),
    ]
    for kwargs, status, message in cases:
        got, body, _ = call(service, "/v1/images", **kwargs)
        error = json.loads(body)["error"]["message"]
        assert (got, "\n" in error) == (status, False) and error.startswith(message), (kwargs, got, error)
    assert call(service, "/v1/health")[0] == 200
    status, body, _ = call(service, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "demo"


def test_a_full_queue_answers_503_with_retry_after_then_serves_again(service):
    burst = MAX_QUEUE + 4
    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        answers = list(pool.map(lambda i: call(service, "/v1/images", {"prompt": f"shape {i}", "seed": i,
                                                                        "steps": 8}), range(burst)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1 and set(statuses) == {200, 503}
    for status, body, headers in answers:
        if status == 503:
            assert int(headers["Retry-After"]) >= 1 and "the queue is full" in json.loads(body)["error"]["message"]
    assert call(service, "/v1/images", {"prompt": "a red circle", "steps": 1})[0] == 200
