"""Where `generate` writes its PNGs: --output as a path, a folder or a template with {index}, {seed},
{stem}; every path is decided and checked before the model loads (no two images share a path, and
none replaces the --from-png or --prompts file)."""

from __future__ import annotations

import argparse
import os
import string
from pathlib import Path

from ..errors import ArgumentError, UnsafeOutputError
from . import generate_images
from ..files.leftovers import partial_name, remove_dead_leftovers

PLACEHOLDERS = ("index", "seed", "stem")
FOLDER_PATTERN = "{stem}_{index:04d}.png"  # the file names when --output names a folder
DEFAULT_OUTPUT = "sample.png"


def numbered_paths(output: str, count: int) -> list[Path]:
    """Plain --output: the path itself for one image, else _0, _1, … before the suffix."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def output_template(output: str) -> str | None:
    """The --output pattern to format, or None for a plain path; a folder becomes FOLDER_PATTERN in it.
    Any brace makes --output a template (so `{{` always means one literal brace, with or without a
    placeholder); an existing folder whose name holds braces is ambiguous and refused."""
    braces = "{" in output or "}" in output
    if output.endswith(("/", os.sep)) or (Path(output).is_dir() and not braces):
        return str(Path(output)).replace("{", "{{").replace("}", "}}") + os.sep + FOLDER_PATTERN
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(output) if f is not None]
    except ValueError as exc:
        raise ArgumentError(f"--output {output!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    unknown = [f for f in fields if f not in PLACEHOLDERS]
    if unknown:
        raise ArgumentError(f"--output {output!r}: unknown placeholder {{{unknown[0]}}}; use "
                            + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
    if braces and Path(output).is_dir():
        raise ArgumentError(f"--output {output!r} is both a template and an existing folder; end it with / to "
                            "write into that folder, or pick another name")
    return output if braces else None


def format_output(template: str, output: str, values: dict) -> Path:
    """One image's path: each placeholder formatted on its own and refused when its text would add
    or climb a folder (a separator, NUL, `.` or `..`): path structure comes from the literal text only."""
    pieces = []
    try:
        for literal, field, spec, conversion in string.Formatter().parse(template):
            pieces.append(literal)
            if field is None:
                continue
            value = values[field]
            value = {"r": repr, "s": str, "a": ascii}[conversion](value) if conversion else value
            text = format(value, spec or "")
            if any(sep in text for sep in {"/", os.sep, "\0"}) or text in (".", ".."):
                raise ArgumentError(f"--output {output!r}: {{{field}}} formats as {text!r}, which would change the "
                                    "folder; placeholders may not add path separators")
            pieces.append(text)
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        if isinstance(exc, ArgumentError):
            raise
        raise ArgumentError(f"--output {output!r}: {exc}") from None
    path = Path("".join(pieces))
    return path if path.suffix.lower() == ".png" else path.with_name(path.name + ".png")


def plan_outputs(args: argparse.Namespace, jobs: list[dict]) -> list[list[Path]]:
    """The PNG path of every image of every job (one list per job), checked before anything is loaded."""
    if args.output is not None and not args.output.strip():
        raise ArgumentError("--output is empty; name a PNG file, a folder (ending in /) or a template")
    output = DEFAULT_OUTPUT if args.output is None else args.output
    seeds = [[job["seed"] + i for i in range(job["num_images"])] for job in jobs]
    source = args.prompts or args.from_png
    stem = Path(source).stem if source else "sample"
    template = output_template(output)
    if template is None:
        flat = numbered_paths(output, sum(len(s) for s in seeds))
    else:
        flat = [format_output(template, output, dict(index=i, seed=seed, stem=stem))
                for i, seed in enumerate(s for job_seeds in seeds for s in job_seeds)]
    inputs = [f for f in (args.from_png, args.prompts) if f] + generate_images.input_files(args, jobs)
    check_distinct(output, flat, inputs=inputs)
    check_writable(output, flat)
    it = iter(flat)
    return [[next(it) for _ in job_seeds] for job_seeds in seeds]


def check_distinct(output: str, paths: list[Path], inputs: list[str]) -> None:
    """No two images share a path (ArgumentError), and none is an input file (UnsafeOutputError)."""
    seen = set()
    sources = {Path(f).resolve() for f in inputs}
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise ArgumentError(f"--output {output!r} names {path} for more than one image; add {{index}}")
        if key in sources:
            raise UnsafeOutputError(f"--output {output!r} would overwrite the input file {path}")
        seen.add(key)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_writable(output: str, paths: list[Path]) -> None:
    """Each path can be written: not an existing folder, its name (and the temporary name beside it)
    short enough, its nearest existing parent a writable folder. Dead runs' leftovers there are removed."""
    checked = set()
    for path in paths:
        if path.is_dir():
            raise UnsafeOutputError(f"--output {output!r} names {path}, which is an existing folder")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        limit = _name_max(parent if parent.is_dir() else Path("."))
        temporary = partial_name(path.name, middle=".xxxxxxxx")
        if any(len(os.fsencode(part)) > limit for part in (*path.parts, temporary)):
            raise UnsafeOutputError(f"--output {output!r}: the file name {path.name[:40]}… is too long for the "
                                    f"filesystem (at most {limit - len(temporary) + len(path.name)} bytes)")
        if parent in checked:
            continue
        if not parent.is_dir():
            raise UnsafeOutputError(f"--output {output!r}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UnsafeOutputError(f"--output {output!r}: cannot write in {parent} (permission denied)")
        checked.add(parent)
        if parent == path.parent:
            remove_dead_leftovers(parent)
