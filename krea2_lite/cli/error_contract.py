"""The error contract of every krea2_lite command line: one `error: …` line on stderr and exit
status 2 for anything the user caused (a bad argument, a path that is missing, unreadable, a
folder where a file was expected, an unknown device, a damaged model file); a one-line report
with status 1 for anything else. `KREA2_LITE_DEBUG=1` re-raises instead (full traceback).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

from ..errors import Krea2LiteError

# Exceptions a user's input or machine causes (argument values, files, disks, memory, numerics).
USER_ERRORS = (Krea2LiteError, ValueError, TypeError, OSError, NotImplementedError, FloatingPointError,
               OverflowError, MemoryError, UnicodeError)
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    return os.environ.get("KREA2_LITE_DEBUG", "") not in ("", "0")


def describe(exc: BaseException) -> str:
    """One line for an exception; OS errors name their path(s), as the user gave them."""
    if isinstance(exc, OSError) and not isinstance(exc, Krea2LiteError) and exc.strerror:
        paths = " → ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        text = f"{paths}: {exc.strerror}" if paths else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else " ".join(line.strip() for line in lines)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning the library raises (an option without effect, a resize, a re-plan) as one
    `warning: …` line; the file and source line of the default format mean nothing to a CLI user."""
    print(f"warning: {describe(message if isinstance(message, BaseException) else Warning(message))}",
          file=file or sys.stderr)


def run_cli(body: Callable[[], int | None]) -> int:
    """Run a command's body under the contract above; returns the exit status."""
    try:
        with warnings.catch_warnings():
            if not debug_enabled():
                warnings.showwarning = _one_line_warning
            return int(body() or 0)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if debug_enabled():
            raise
        print(f"error: {describe(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # a bug in krea2_lite: still one line, and how to get the traceback
        if debug_enabled():
            raise
        print(f"error: internal error {type(exc).__name__}: {describe(exc)} (rerun with KREA2_LITE_DEBUG=1 for "
              "the traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
