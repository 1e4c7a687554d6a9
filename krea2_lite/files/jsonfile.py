"""One validated reader for every JSON file krea2_lite reads.

Every failure (missing, unreadable, not UTF-8, not JSON, the wrong JSON type, missing keys) is a
`JsonFileError` naming the file and what was expected, never a bare `JSONDecodeError`,
`AttributeError` or `KeyError` from the code that uses the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointNotFoundError, JsonFileError

_TYPE_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a string", int: "an integer",
               float: "a number", bool: "true/false"}
MAX_JSON_BYTES = 256 << 20  # a tokenizer.json is ~10 MB; anything far larger is not one of ours
MAX_JSON_DEPTH = 64  # objects / arrays nested deeper are refused (ours nest 4 deep)
MAX_INT_DIGITS = 64  # an integer literal with more digits is refused (Python's own limit is 4300)


def _big_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer with {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _depth(data) -> int:
    """How deep objects / arrays nest (iterative: no recursion of our own). Nesting far past the limit
    never gets here: the parser itself stops with a RecursionError, caught like any bad JSON."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)
                        if isinstance(v, dict | list))
    return deepest


def _type_name(value_type) -> str:
    if isinstance(value_type, tuple):
        return " or ".join(_type_name(t) for t in value_type)
    return _TYPE_NAMES.get(value_type, value_type.__name__)


def _found(value) -> str:
    return "null" if value is None else _type_name(type(value))


def read_json(path: str | os.PathLike, *, expect=dict, required: tuple[str, ...] = (), what: str = "JSON file",
              default=None):
    """Parse `path` and check it holds `expect` (a type or tuple of types) with the `required` keys.

    `default` (when not None) is returned for a file that does not exist; otherwise a missing file
    is a CheckpointNotFoundError. `what` says what the file is for, for the messages.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        if default is not None:
            return default
        raise CheckpointNotFoundError(f"{path}: {what} not found")
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise JsonFileError(f"{path}: {what} is {path.stat().st_size} bytes; not a {what}")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise JsonFileError(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise JsonFileError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    return parse_json(text, where=str(path), expect=expect, required=required, what=what)


def parse_json(text: str | bytes, *, where: str, expect=dict, required: tuple[str, ...] = (),
               what: str = "JSON"):
    """`read_json` for text that is not a file of its own (a safetensors header field); `where`
    names its origin in the messages."""
    if isinstance(text, bytes | bytearray):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonFileError(f"{where}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if len(text) > MAX_JSON_BYTES:
        raise JsonFileError(f"{where}: {what} is {len(text)} characters (at most {MAX_JSON_BYTES})")
    try:
        data = json.loads(text, parse_int=_big_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        detail = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) \
            else str(exc) or type(exc).__name__
        raise JsonFileError(f"{where}: {what} is not valid JSON ({detail})") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise JsonFileError(f"{where}: {what} nests objects / arrays deeper than {MAX_JSON_DEPTH} levels")
    if expect is not None and (not isinstance(data, expect) or (isinstance(data, bool) and bool not in
                                                                 (expect if isinstance(expect, tuple) else (expect,)))):
        raise JsonFileError(f"{where}: {what} must be {_type_name(expect)}, found {_found(data)}")
    missing = [key for key in required if key not in data]
    if missing:
        raise JsonFileError(f"{where}: {what} lacks the required key(s) {missing}")
    return data


def get_typed(data: dict, key: str, expect, *, where: str, default=None):
    """data[key] checked against `expect` (a type or tuple of types); `default` when absent or null."""
    value = data.get(key)
    if value is None:
        return default
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise JsonFileError(f"{where}: '{key}' must be {_type_name(expect)}, found {_found(value)} ({value!r:.60})")
    return value
