"""Rename that refuses, atomically, when the target exists (two runs racing for one output).

Linux: `renameat2(..., RENAME_NOREPLACE)` through libc. Where that is missing (other systems, old
libc, a filesystem without the flag): a folder is claimed with `os.mkdir(dst)` (atomic: exactly
one process creates it) and the source folder renamed onto the empty folder it claimed (POSIX
rename replaces an empty folder); a file is hard-linked to `dst` (atomic, fails when `dst`
exists) and its old name unlinked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()


def rename_noreplace(src: Path, dst: Path) -> str:
    """Rename `src` to `dst`; FileExistsError when `dst` exists (or appears meanwhile). Returns the
    mechanism used ("renameat2" or "claim")."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return "renameat2"
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    return _claim_then_rename(Path(src), Path(dst))


def _claim_then_rename(src: Path, dst: Path) -> str:
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)  # FileExistsError when another got there first
        try:
            os.rename(src, dst)
        except BaseException:
            os.rmdir(dst)
            raise
        return "claim"
    os.link(src, dst)
    os.unlink(src)
    return "claim"


RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux `renameat2(RENAME_EXCHANGE)`): a reader sees the old or
    the new one, never neither. False where the call or the flag is missing (the caller falls back)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
