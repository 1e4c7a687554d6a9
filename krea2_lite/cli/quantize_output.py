"""Where `python -m krea2_lite.quantize` may write, and how it replaces and cleans up.

Rules (each once lost data: `--out parent --force` deleted the source model beside it):
  * --out may not be the source, contain it or lie inside it (paths resolved, symlinks followed),
    nor be `.`-like (the working folder or an ancestor of it), the home folder or a filesystem root;
  * --force replaces only a folder krea2_lite wrote (it holds our manifest) or an empty folder;
    never a file, never anything else;
  * the work happens in a hidden temporary folder beside --out, removed on any error, Ctrl-C or
    SIGTERM, and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from ..errors import UnsafeOutputError
from ..files.leftovers import OLD_MARK, dead_leftovers, partial_name, remove_dead_leftovers, remove_path
from ..files.no_replace import rename_noreplace
from ..files.quantized_folder import FORMAT, MANIFEST, written_files


def _is_ancestor(parent: Path, child: Path) -> bool:
    return parent == child or parent in child.parents


def check_output(out_arg: str, source: Path, force: bool) -> Path:
    """The resolved --out, or UnsafeOutputError / FileExistsError naming why it may not be used."""
    if not str(out_arg).strip():
        raise UnsafeOutputError("--out is empty; name a new folder for the quantized model")
    out = Path(out_arg).expanduser().resolve()
    src = source.expanduser().resolve()
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder known
        home = Path(out.anchor)
    if out == Path(out.anchor) or _is_ancestor(out, home) or _is_ancestor(out, Path.cwd().resolve()):
        raise UnsafeOutputError(f"--out {out_arg} ({out}) is a filesystem root, the home folder or the working "
                                "folder (or one of its parents); name a new folder, e.g. --out ./model-int8")
    if _is_ancestor(out, src):
        raise UnsafeOutputError(f"--out {out_arg} ({out}) is or contains --model {src}; writing there could "
                                "delete the source. Pick a new folder outside it")
    if _is_ancestor(src, out):
        raise UnsafeOutputError(f"--out {out_arg} ({out}) lies inside --model {src}; krea2_lite never writes into "
                                "a source model. Pick a folder outside it")
    if out.exists() or out.is_symlink():
        if not force:
            raise FileExistsError(f"{out} already exists; pass --force to replace it")
        check_replaceable(out)
    return out


def check_replaceable(out: Path) -> None:
    """--force may only remove an earlier krea2_lite output or an empty folder."""
    if out.is_symlink() or not out.is_dir():
        raise UnsafeOutputError(f"--out {out} exists and is not a folder; --force only replaces a folder written "
                                "by krea2_lite.quantize (remove the file yourself if it should go)")
    if not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    ours = False
    if manifest.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            ours = f'"{FORMAT}"' in manifest.read_text(encoding="utf-8")[:4096]
    if not ours:
        raise UnsafeOutputError(f"--out {out} exists and was not written by krea2_lite.quantize (no {MANIFEST} of "
                                "ours inside); --force only replaces such folders or empty ones. Remove it yourself "
                                "or pick another --out")
    foreign = first_foreign_file(out)
    if foreign is not None:
        raise UnsafeOutputError(f"--out {out} holds {foreign}, which krea2_lite did not write (its {MANIFEST} lists "
                                "what it wrote); --force never deletes a file of yours: move it out first")


def first_foreign_file(out: Path) -> str | None:
    """The first entry of `out` (relative, sorted) that its manifest does not list as written by us;
    folders count as ours only while they hold something we wrote."""
    ours = written_files(out)
    if ours is None:
        return "an unreadable or hand-edited " + MANIFEST
    parents = {str(Path(name).parent) for name in ours} | {str(p) for name in ours for p in Path(name).parents}
    for root, dirs, files in os.walk(out, followlinks=False):
        dirs.sort()
        rel_root = Path(root).relative_to(out)
        for name in sorted(files) + [d for d in dirs if (Path(root) / d).is_symlink()]:
            rel = (rel_root / name).as_posix()
            if rel not in ours:
                return rel
        for name in dirs:
            rel = (rel_root / name).as_posix()
            if rel not in parents and not (Path(root) / name).is_symlink():
                return rel + "/"
    return None


def temporary_folder(out: Path) -> Path:
    return out.parent / partial_name(out.name)


def remove_stale(out: Path) -> None:
    """Temporary folders of killed runs (their process is gone) beside --out are removed, whatever
    output they were for; so are `.NAME.old-PID` copies left between the two renames of a replace,
    once NAME holds a complete folder again. Names are compared exactly, never globbed."""
    remove_dead_leftovers(out.parent)
    if (out / MANIFEST).is_file():
        for path in dead_leftovers(out.parent, OLD_MARK, prefix=f".{out.name}{OLD_MARK}"):
            if (path / MANIFEST).is_file():
                remove_path(path)


def install(tmp: Path, out: Path, force: bool = False) -> None:
    """Rename the finished `tmp` to `out`. Without --force the rename refuses atomically when `out`
    appeared meanwhile (another run finished first: FileExistsError, its folder kept). With --force an
    earlier output of ours is replaced, checked again (it may have changed while we worked)."""
    if not force or (not out.exists() and not out.is_symlink()):
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise FileExistsError(f"{out} appeared while this run worked (another run?); it was left as it is. "
                                  "Pass --force to replace it") from None
        return
    check_replaceable(out)
    old = out.parent / f".{out.name}{OLD_MARK}{os.getpid()}"
    os.replace(out, old)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` / `except BaseException` cleanup runs."""


@contextlib.contextmanager
def removed_on_failure(tmp: Path):
    """Create `tmp`; remove it on any exception, Ctrl-C or SIGTERM (the signal then ends the run)."""
    def on_term(signum, frame):
        raise _Terminated(f"terminated by signal {signum}")

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: no handler, the except still cleans
        previous = signal.signal(signal.SIGTERM, on_term)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
