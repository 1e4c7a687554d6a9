"""`manifest.jsonl`: one line per finished image, written only by the driver.

Line: {"index", "line", "prompt", "seed", "settings" (the PNG's metadata), "request" (what decides
the bytes, see jobs.plan_images), "file", "sha256", "seconds", "worker"}. The driver keeps the
entries in memory, one per index, and replaces the whole file atomically (storage.write), so the
file never holds half a line or two lines for one image, whatever Ray retried.
"""

from __future__ import annotations

import json

from .storage import Storage, sha256

MANIFEST = "manifest.jsonl"


def read_manifest(storage: Storage) -> dict[int, dict]:
    """index → entry of the existing manifest; lines that are not well-formed entries are dropped."""
    data = storage.read(MANIFEST)
    entries = {}
    for line in (data or b"").decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("index"), int) and isinstance(entry.get("file"), str):
            entries[entry["index"]] = entry
    return entries


def write_manifest(storage: Storage, entries: dict[int, dict]) -> None:
    text = "".join(json.dumps(entries[i], ensure_ascii=False) + "\n" for i in sorted(entries))
    storage.write(MANIFEST, text.encode("utf-8"))


def still_valid(storage: Storage, entry: dict | None, image: dict) -> bool:
    """The image is done: its entry asks for the same request and file, and the file's bytes hash to
    the entry's SHA-256 (a truncated, damaged or replaced PNG does not)."""
    if entry is None or entry.get("request") != image["request"] or entry.get("file") != image["file"]:
        return False
    data = storage.read(image["file"])
    return data is not None and sha256(data) == entry.get("sha256")
