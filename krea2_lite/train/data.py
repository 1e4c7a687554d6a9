"""The training images and captions of a folder, and the aspect buckets they are cut to.

A folder holds `NAME.png|jpg|jpeg|webp` beside `NAME.txt` (UTF-8), or a `metadata.jsonl` with one
`{"file_name": ..., "text": ...}` object per line (Hugging Face image folders). With both, the
metadata wins for the files it names. Images that cannot be read, have no caption, a caption that
is not UTF-8 text, or are too small (area below a quarter of resolution²) are collected as skips:
the caller lists them once; nothing left is an error.

Buckets: every (width, height) with sides multiples of 16 and area ≤ resolution² whose aspect
ratio is within [1/4, 4]; an image goes to the bucket of nearest log aspect ratio, resized to
cover it (Lanczos) and centre-cropped (or, with center_crop off, stretched to it).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArgumentError, ImageInputError
from ..files.jsonfile import MAX_JSON_BYTES, parse_json
from ..images_in import check_header_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_ASPECT = 4.0
MAX_CAPTION_BYTES = 1 << 20  # far past any text encoder's context


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    size: tuple[int, int]     # (width, height) of the source
    bucket: tuple[int, int]   # (width, height) it is cut to
    digest: str               # sha256 of the image file's bytes


def buckets(resolution: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of 16, area ≤ resolution², the largest height per width."""
    area = resolution * resolution
    out = []
    for width in range(16, 4 * resolution + 1, 16):
        height = (area // width) // 16 * 16
        if height >= 16 and 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            out.append((width, height))
    return out


def bucket_for(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    aspect = math.log(size[0] / size[1])
    return min(buckets(resolution), key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def _metadata_captions(folder: Path, skips: list[str]) -> dict[str, str]:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ArgumentError(f"{path}: {path.stat().st_size} bytes; a metadata.jsonl holds at most {MAX_JSON_BYTES}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # JSON lines end at \n only
    except UnicodeDecodeError:
        raise ArgumentError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:  # the guarded reader: depth, integer and size limits (a RecursionError is its JsonFileError)
            row = parse_json(line, where=f"{path}:{number}", required=("file_name", "text"), what="the line")
            name, text = row["file_name"], row["text"]
        except ValueError:
            skips.append(f"{path}:{number}: not a JSON object with file_name and text")
            continue
        if not isinstance(name, str) or not isinstance(text, str) or not text.strip():
            skips.append(f"{path}:{number}: file_name and text must be non-empty strings")
            continue
        captions[name] = text.strip()
    return captions


def _caption_file(image: Path, skips: list[str]) -> str | None:
    text_path = image.with_suffix(".txt")
    if not text_path.is_file():
        skips.append(f"{image.name}: no caption ({text_path.name} missing)")
        return None
    if text_path.stat().st_size > MAX_CAPTION_BYTES:  # a caption is a sentence; never read a huge file whole
        skips.append(f"{text_path.name}: {text_path.stat().st_size} bytes, not a caption (at most {MAX_CAPTION_BYTES})")
        return None
    try:
        text = text_path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        skips.append(f"{text_path.name}: not UTF-8 text")
        return None
    if not text or "\x00" in text:
        skips.append(f"{text_path.name}: {'empty' if not text else 'binary, not text'}")
        return None
    return text


def _image_size(path: Path, skips: list[str]) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            check_header_size(image.size, path.name)  # before verify / decode: a small file may declare a huge image
            image.verify()
        with Image.open(path) as image:
            return image.size
    except ImageInputError as exc:
        skips.append(str(exc))
        return None
    except Exception as exc:  # PIL raises many types for damaged files
        skips.append(f"{path.name}: cannot be read as an image ({type(exc).__name__})")
        return None


def scan_folder(folder: str | Path, resolution: int, trigger: str | None = None) -> tuple[list[Item], list[str]]:
    """(items, skips) of a data folder; an ArgumentError when it holds nothing usable."""
    folder = Path(folder)
    skips: list[str] = []
    meta = _metadata_captions(folder, skips)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    items = []
    for image in images:
        caption = meta.get(image.name) or _caption_file(image, skips)
        if caption is None:
            continue
        size = _image_size(image, skips)
        if size is None:
            continue
        if size[0] * size[1] < resolution * resolution / 4:
            skips.append(f"{image.name}: too small ({size[0]}×{size[1]}; needs an area ≥ ({resolution}/2)²)")
            continue
        if trigger:
            caption = f"{trigger.strip()} {caption}"
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        items.append(Item(image, caption, size, bucket_for(size, resolution), digest))
    if not items:
        why = "; ".join(skips[:5]) if skips else "no .png/.jpg/.jpeg/.webp images"
        raise ArgumentError(f"--data {folder}: nothing to train on ({why})")
    return items, skips


def load_pixels(item: Item, center_crop: bool = True) -> np.ndarray:
    """The image cut to its bucket: (height, width, 3) uint8."""
    from PIL import Image

    width, height = item.bucket
    with Image.open(item.image) as image:
        image = image.convert("RGB")
        if not center_crop:
            return np.asarray(image.resize((width, height), Image.LANCZOS))
        scale = max(width / image.width, height / image.height)
        cover = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(cover, Image.LANCZOS)
        left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
        return np.asarray(image.crop((left, top, left + width, top + height)))
