"""Prompt files: `python -m krea2_lite generate --prompts FILE`, `python -m krea2_lite.train --sample-prompts FILE`.

`.txt`: one prompt a line; blank lines are skipped. `.jsonl`: one JSON object a line, with a
"prompt" and any of the per-line overrides in OVERRIDES (blank lines skipped). Every problem is a
PromptFileError naming the file and the line, raised before any model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ..errors import JsonFileError, PromptFileError
from .jsonfile import parse_json

# key: (kind, what the message says is expected)
OVERRIDES = {
    "negative_prompt": ("str", "a string"),
    "seed": ("int", "an integer"),
    "steps": ("positive", "a positive integer"),
    "num_images": ("positive", "a positive integer"),
    "width": ("positive", "a positive integer (pixels)"),
    "height": ("positive", "a positive integer (pixels)"),
    "cfg": ("number", "a number >= 0"),
    "guidance": ("number", "a number >= 0"),
    "mu": ("float", "a finite number"),
    "size": ("size", 'a "WIDTHxHEIGHT" string such as "768x512"'),
    "image": ("str", "a path (relative to the prompt file)"),
    "mask": ("str", "a path (relative to the prompt file)"),
    "strength": ("number", "a number in (0, 1]"),
}
_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


MAX_PROMPT_FILE_BYTES = 16 << 20  # 16 MiB: thousands of long prompts; /dev/zero stops here
MAX_PROMPT_LINES = 10_000  # prompts in one file
FORMATS = ("auto", "txt", "jsonl")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _read_limited(path: Path) -> str:
    """The file's text, read up to MAX_PROMPT_FILE_BYTES (a FIFO or device such as /dev/zero or
    <(cat x) is read the same way, never to the end of memory)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PROMPT_FILE_BYTES + 1)
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read the prompt file ({exc.strerror or exc})") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise PromptFileError(f"{path}: larger than {MAX_PROMPT_FILE_BYTES} bytes; not a prompt file (split it)")
    nul = data.find(b"\0")
    if nul >= 0:
        raise PromptFileError(f"{path}: holds a NUL byte at byte {nul}; not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _is_jsonl(path: Path, lines: list[str], fmt: str) -> bool:
    """jsonl by the explicit format, else by suffix (.jsonl, .ndjson; .txt is text), else by content:
    every non-blank line starts with '{'."""
    if fmt != "auto":
        return fmt == "jsonl"
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES or suffix == ".txt":
        return suffix != ".txt"
    filled = [line.lstrip() for line in lines if line.strip()]
    return bool(filled) and all(line.startswith("{") for line in filled)


def read_prompt_file(path: str | os.PathLike, fmt: str = "auto") -> list[dict]:
    """[{"prompt": str, "line": n, <overrides>}, ...] in file order; `cfg` is returned as "guidance"
    and `size` as width / height. Lines end at "\n" only (a trailing "\r" is dropped): U+2028, form
    feed or \x1e are characters of the prompt, not line breaks. `fmt`: auto | txt | jsonl."""
    path = Path(path)
    if fmt not in FORMATS:
        raise PromptFileError(f"{path}: unknown prompt file format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto" and path.suffix.lower() == ".json":
        raise PromptFileError(f"{path}: expected a .txt file (one prompt a line) or a .jsonl file (one JSON "
                              "object a line), not a .json document")
    lines = [line.removesuffix("\r") for line in _read_limited(path).split("\n")]
    jsonl = _is_jsonl(path, lines, fmt)
    jobs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(jobs) >= MAX_PROMPT_LINES:
            raise PromptFileError(f"{path}:{number}: more than {MAX_PROMPT_LINES} prompts; split the file")
        where = f"{path}:{number}"
        job = _parse_json_line(line, where) if jsonl else {"prompt": line.strip()}
        for key in ("image", "mask"):  # images in: relative to the prompt file, not the working folder
            if key in job:
                job[key] = str(path.parent / job[key])
        job["line"] = number
        jobs.append(job)
    if not jobs:
        raise PromptFileError(f"{path}: no prompts (the file is empty or only blank lines)")
    return jobs


def _parse_json_line(line: str, where: str) -> dict:
    try:
        data = parse_json(line, where=where, expect=None, what="prompt line")
    except JsonFileError as exc:  # "FILE:LINE: bad JSON (…)", the limits (depth, digits) included
        raise PromptFileError(str(exc).replace(f"{where}: prompt line is not valid JSON", f"{where}: bad JSON")
                              ) from None
    if not isinstance(data, dict):
        raise PromptFileError(f"{where}: expected a JSON object such as {{\"prompt\": \"...\"}}, "
                              f"got {type(data).__name__}")
    prompt = data.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
    unknown = sorted(set(data) - set(OVERRIDES))
    if unknown:
        raise PromptFileError(f"{where}: unknown key {unknown[0]!r}; a line may set 'prompt' and "
                              + ", ".join(repr(k) for k in OVERRIDES))
    if "cfg" in data and "guidance" in data:
        raise PromptFileError(f"{where}: 'cfg' and 'guidance' are the same setting; give one")
    if "size" in data and ("width" in data or "height" in data):
        raise PromptFileError(f"{where}: 'size' and 'width'/'height' say the same thing; give one")
    job = {"prompt": prompt}
    for key, value in data.items():
        job.update(check_value(key, value, where))
    return job


def check_value(key: str, value, where: str) -> dict:
    """{setting: value} for one override `key` (cfg → guidance, size → width + height), or a
    PromptFileError saying at `where` what was expected."""
    kind, expected = OVERRIDES[key]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = (is_int or isinstance(value, float)) and math.isfinite(value)
    ok = {"str": isinstance(value, str), "int": is_int, "positive": is_int and value > 0,
          "number": is_number and value >= 0, "float": is_number,
          "size": isinstance(value, str) and _SIZE.match(value) is not None}[kind]
    if not ok:
        raise PromptFileError(f"{where}: {key!r} must be {expected}, got {json.dumps(value)}")
    if kind == "size":
        width, height = (int(v) for v in _SIZE.match(value).groups())
        if not width or not height:
            raise PromptFileError(f"{where}: {key!r} must be {expected}, got {json.dumps(value)}")
        return {"width": width, "height": height}
    if key == "cfg":
        return {"guidance": float(value)}
    return {key: float(value) if kind in ("number", "float") else value}
