"""The one reader of a PNG's text chunks (tEXt, zTXt, iTXt), for PNGs from anyone.

It walks the chunk list itself and never decodes pixels, so a header claiming 20000×10000 pixels
(PIL's DecompressionBombError) or a damaged image body does not matter. Limits, each a
PngTextError naming the file and the chunk:
  * MAX_PNG_BYTES for the whole file, MAX_TEXT_CHUNKS text chunks;
  * MAX_TEXT_BYTES for one chunk's text after decompression (zlib is asked for at most that many
    bytes, so a zlib bomb stops there); compression method 0 (zlib) only, as the PNG spec says.
`save_png` refuses to write a chunk above MAX_TEXT_BYTES, so everything it writes reads back.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from ..errors import MetadataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 1 << 30
MAX_TEXT_CHUNKS = 64
MAX_TEXT_BYTES = 1 << 20  # 1 MiB, PIL's own MAX_TEXT_CHUNK: other readers read what we write
_TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")
_OTHER_IMAGES = ((b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"WEBP", "WEBP"), (b"BM", "BMP"))


class PngTextError(MetadataError):
    """A PNG whose text chunks cannot be read safely."""


def _inflate(data: bytes, where: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_BYTES + 1)
    except zlib.error as exc:
        raise PngTextError(f"{where}: damaged compressed text ({exc})") from None
    if len(out) > MAX_TEXT_BYTES:
        raise PngTextError(f"{where}: decompresses to more than {MAX_TEXT_BYTES} bytes")
    return out


def _decode_chunk(kind: bytes, body: bytes, where: str) -> tuple[str, str]:
    keyword, sep, rest = body.partition(b"\0")
    if not sep or not 1 <= len(keyword) <= 79:
        raise PngTextError(f"{where}: no valid keyword")
    key = keyword.decode("latin-1")
    if kind == b"tEXt":
        return key, rest.decode("latin-1")
    if kind == b"zTXt":
        if rest[:1] != b"\0":
            raise PngTextError(f"{where}: compression method {rest[:1]!r} (only 0, zlib, exists)")
        return key, _inflate(rest[1:], where).decode("latin-1")
    if len(rest) < 2:
        raise PngTextError(f"{where}: truncated iTXt chunk")
    compressed, method = rest[0], rest[1]
    _language, _, rest = rest[2:].partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    if compressed:
        if method != 0:
            raise PngTextError(f"{where}: compression method {method} (only 0, zlib, exists)")
        text = _inflate(text, where)
    try:
        return key, text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PngTextError(f"{where}: iTXt text is not UTF-8 ({exc.reason})") from None


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """{keyword: text} of every text chunk (the first of a repeated keyword wins)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_PNG_BYTES:
                raise PngTextError(f"{path}: {size} bytes; larger than {MAX_PNG_BYTES}, not read")
            head = fh.read(12)
            if head[:8] != PNG_SIGNATURE:
                other = next((name for magic, name in _OTHER_IMAGES if head.startswith(magic) or
                              (name == "WEBP" and head[8:12] == magic)), None)
                raise PngTextError(f"{path}: not a PNG (a {other} image)" if other else
                                   f"{path}: cannot read it as a PNG (no PNG signature)")
            fh.seek(8)
            return _read_chunks(fh, path)
    except OSError as exc:
        raise PngTextError(f"{path}: cannot read it as a PNG ({exc.strerror or exc})") from None


def _read_chunks(fh, path: Path) -> dict[str, str]:
    text: dict[str, str] = {}
    count = 0
    for number in range(1 << 20):
        head = fh.read(8)
        if len(head) < 8:
            raise PngTextError(f"{path}: truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", head)
        where = f"{path}: chunk {number} ({kind.decode('latin-1')!r})"
        if kind in _TEXT_TYPES:
            count += 1
            if count > MAX_TEXT_CHUNKS:
                raise PngTextError(f"{where}: more than {MAX_TEXT_CHUNKS} text chunks")
            if length > MAX_TEXT_BYTES + 1024:
                raise PngTextError(f"{where}: {length} bytes; text chunks hold at most {MAX_TEXT_BYTES}")
            body = fh.read(length)
            if len(body) < length:
                raise PngTextError(f"{where}: truncated")
            key, value = _decode_chunk(kind, body, where)
            text.setdefault(key, value)
            fh.seek(4, os.SEEK_CUR)  # CRC
        elif kind == b"IEND":
            return text
        else:
            fh.seek(length + 4, os.SEEK_CUR)
    raise PngTextError(f"{path}: too many chunks")
