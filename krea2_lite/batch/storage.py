"""Where a batch job's files live: a local folder, or any URI `pyarrow.fs` opens (s3://, gs://, hdfs://).

Every write is atomic for a reader: a local file is written under a temporary name in the same folder
and renamed; a remote object is written whole by one `open_output_stream` (object stores publish an
object only when its upload completes), so a reader sees the old bytes or the new ones, never half.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path


def is_uri(location: str) -> bool:
    """s3://, gs://, hdfs://, file:// … go through pyarrow.fs; a plain path is a local folder."""
    return "://" in str(location)


class Storage:
    """A folder (local or remote) holding a job's PNGs and its manifest; picklable (sent to workers)."""

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        self.location = location
        self.remote = is_uri(location)
        if self.remote:
            self._fs, self._root = _open_uri(location)
        else:
            self._root = str(Path(location).expanduser().resolve())

    def __reduce__(self):  # a pyarrow filesystem rebuilds itself from the URI on the worker
        return (Storage, (self.location,))

    def path(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{name}" if self.remote else os.path.join(self._root, name)

    def display(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}" if self.remote else self.path(name)

    def makedirs(self) -> None:
        if self.remote:
            self._fs.create_dir(self._root, recursive=True)
        else:
            os.makedirs(self._root, exist_ok=True)

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            if self.remote:
                with self._fs.open_input_stream(self.path(name)) as fh:
                    return fh.read()
            with open(self.path(name), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Replace `name` with `data` atomically (see the module docstring)."""
        if self.remote:
            with self._fs.open_output_stream(self.path(name)) as fh:
                fh.write(data)
            return
        final = self.path(name)
        tmp = os.path.join(self._root, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _open_uri(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with its own words
        raise ValueError(f"--output {uri!r}: pyarrow.fs cannot open it ({exc})") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
