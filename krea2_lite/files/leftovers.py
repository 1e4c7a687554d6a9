"""Temporary names beside an output, and the removal of those left by processes that died.

Every temporary file or folder krea2_lite writes beside an output is named `.NAME<anything>.partial-PID`
(PID: the writing process). A run killed with SIGKILL cannot clean up; the next quantize run or
`generate` writing into the same folder removes every such leftover whose process no longer exists
(`remove_dead_leftovers`). Names are matched exactly (os.listdir + string tests), never globbed: a
user's folder called `q?` or `[a]` matches nothing but itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

PARTIAL_MARK = ".partial-"
OLD_MARK = ".old-"


def partial_name(name: str, pid: int | None = None, middle: str = "") -> str:
    """`.NAME<middle>.partial-PID`: the temporary name of `name` written by process `pid` (default: us)."""
    return f".{name}{middle}{PARTIAL_MARK}{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process, or not a pid we can ask about: keep its files
    return True


def leftover_pid(name: str, mark: str = PARTIAL_MARK, prefix: str = ".") -> int | None:
    """The PID in a leftover's name (`prefix…markPID`, PID all digits), else None."""
    if not name.startswith(prefix) or mark not in name:
        return None
    pid = name.rsplit(mark, 1)[1]
    return int(pid) if pid.isdigit() and len(pid) <= 10 else None


def dead_leftovers(folder: Path, mark: str = PARTIAL_MARK, prefix: str = ".") -> list[Path]:
    """Entries of `folder` named `prefix…markPID` whose process is gone (not ours)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        pid = leftover_pid(name, mark, prefix)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            found.append(folder / name)
    return found


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree; errors ignored (a leftover we cannot remove stays)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def remove_dead_leftovers(folder: Path, mark: str = PARTIAL_MARK, prefix: str = ".") -> list[Path]:
    """Remove the leftovers of dead processes in `folder`; return what was removed."""
    removed = dead_leftovers(folder, mark, prefix)
    for path in removed:
        remove_path(path)
    return removed
