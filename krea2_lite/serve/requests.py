"""`POST /v1/images` bodies → checked image requests, with the library's own bounds and messages.

Every problem is a RequestError with the HTTP status and the one-line message the CLI would print
for the same value (checks.py wording). Nothing here touches the filesystem except resolving a
LoRA name inside the operator's LoRA folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import checks

FIELDS = ("prompt", "negative_prompt", "width", "height", "size", "steps", "guidance", "seed", "num_images", "n",
          "loras", "model", "response_format", "user")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # no separators, no leading dot


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str | None
    width: int | None
    height: int | None
    steps: int | None
    guidance: float | None
    seed: int
    num_images: int
    loras: tuple = field(default=())  # ((name, path, scale), ...)

    def batch_key(self) -> tuple:
        """Requests with equal keys run as one pipeline call (their prompts and seeds may differ)."""
        return (self.negative_prompt, self.width, self.height, self.steps, self.guidance, self.num_images, self.loras)


def parse_body(body: bytes, *, model_id: str, lora_dir: Path | None, max_images: int) -> ImageRequest:
    """JSON body → ImageRequest, or RequestError(400, one line)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object such as {{\"prompt\": \"...\"}}, "
                                f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; a request may set " + ", ".join(FIELDS))
    try:
        return _check(data, model_id, lora_dir, max_images)
    except (ValueError, TypeError) as exc:
        raise RequestError(400, str(exc).splitlines()[0]) from None


def _check(data: dict, model_id: str, lora_dir: Path | None, max_images: int) -> ImageRequest:
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    negative = data.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise TypeError(f"negative_prompt must be a string, got {negative!r}")
    if data.get("model") not in (None, model_id):
        raise ValueError(f"model {data['model']!r} is not served here; this server runs {model_id!r}")
    if data.get("response_format", "b64_json") != "b64_json":
        raise ValueError("response_format must be 'b64_json' (this server returns no URLs)")
    width, height = _size(data)
    if "n" in data and "num_images" in data:
        raise ValueError("'n' and 'num_images' are the same setting; give one")
    images = checks.check_int("num_images", data.get("num_images", data.get("n", 1)), 1, max_images)
    seed = checks.check_seed(data.get("seed", 0), images)
    steps = data.get("steps")
    guidance = data.get("guidance")
    return ImageRequest(
        prompt=prompt, negative_prompt=negative, width=width, height=height, seed=seed, num_images=images,
        steps=None if steps is None else checks.check_steps(steps),
        guidance=None if guidance is None else checks.check_number("guidance", guidance, 0.0,
                                                                      checks.MAX_GUIDANCE),
        loras=tuple(_loras(data.get("loras", []), lora_dir)))


def _size(data: dict) -> tuple[int | None, int | None]:
    if "size" in data:
        if "width" in data or "height" in data:
            raise ValueError("'size' and 'width'/'height' say the same thing; give one")
        match = _SIZE.match(data["size"]) if isinstance(data["size"], str) else None
        if match is None:
            raise ValueError(f"size must be a 'WIDTHxHEIGHT' string such as '1024x1024', got {data['size']!r}")
        data = dict(width=int(match.group(1)), height=int(match.group(2)))
    sides = []
    for side in ("width", "height"):
        value = data.get(side)
        if value is not None:  # the pipeline's own rounding, so the noise below has its shape
            value = checks.check_side(side, value)
            value = checks.SIZE_MULTIPLE * math.ceil(value / checks.SIZE_MULTIPLE)
        sides.append(value)
    return sides[0], sides[1]


def _loras(value, lora_dir: Path | None) -> list[tuple[str, str, float]]:
    """[{name, scale}] → [(name, path, scale)]: a bare name of a .safetensors file directly inside the
    operator's --lora-dir (symlinks resolved and checked too); never any other path."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise TypeError("loras must be a list of {\"name\": ..., \"scale\": ...} objects")
    if value and lora_dir is None:
        raise ValueError("this server has no LoRA folder (the operator starts it with --lora-dir)")
    out = []
    for item in value:
        name, scale = item.get("name"), item.get("scale", 1.0)
        if set(item) - {"name", "scale"}:
            raise ValueError(f"a LoRA entry may set 'name' and 'scale', got {sorted(item)}")
        if not isinstance(name, str) or not LORA_NAME.match(name) or ".." in name:
            raise ValueError(f"LoRA name {name!r} must be a file name from the server's LoRA folder "
                             "(letters, digits, '_', '-', '.'; no path)")
        scale = checks.check_number(f"LoRA {name!r} scale", scale, -10.0, 10.0)
        stem = name.removesuffix(".safetensors")
        path = (lora_dir / f"{stem}.safetensors").resolve()
        if path.parent != lora_dir or not path.is_file():
            raise ValueError(f"no LoRA named {name!r} in the server's LoRA folder")
        out.append((stem, str(path), scale))
    if len({n for n, _, _ in out}) != len(out):
        raise ValueError("a LoRA is named twice")
    return out
