"""Where `generate` writes its PNGs: --output as a path, a folder or a template with {index}, {seed},
{stem}; every path is decided and checked before the model loads (no two images share a path, and
none replaces the --from-png or --prompts file)."""

from __future__ import annotations

import argparse
import os
import string
from pathlib import Path

from ..errors import ArgumentError, UnsafeOutputError

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
    """The --output pattern to format, or None for a plain path; a folder becomes FOLDER_PATTERN in it."""
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        return str(Path(output) / FOLDER_PATTERN)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(output) if f is not None]
    except ValueError as exc:
        raise ArgumentError(f"--output {output!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    unknown = [f for f in fields if f not in PLACEHOLDERS]
    if unknown:
        raise ArgumentError(f"--output {output!r}: unknown placeholder {{{unknown[0]}}}; use "
                            + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
    return output if fields else None


def plan_outputs(args: argparse.Namespace, jobs: list[dict]) -> list[list[Path]]:
    """The PNG path of every image of every job (one list per job), checked before anything is loaded."""
    output = args.output or DEFAULT_OUTPUT
    seeds = [[job["seed"] + i for i in range(job["num_images"])] for job in jobs]
    source = args.prompts or args.from_png
    stem = Path(source).stem if source else "sample"
    template = output_template(output)
    if template is None:
        flat = numbered_paths(output, sum(len(s) for s in seeds))
    else:
        try:
            flat = [Path(template.format(index=i, seed=seed, stem=stem))
                    for i, seed in enumerate(s for job_seeds in seeds for s in job_seeds)]
        except (ValueError, IndexError, KeyError) as exc:
            raise ArgumentError(f"--output {output!r}: {exc}") from None
        flat = [p if p.suffix.lower() == ".png" else p.with_name(p.name + ".png") for p in flat]
    check_distinct(output, flat, inputs=[f for f in (args.from_png, args.prompts) if f])
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
