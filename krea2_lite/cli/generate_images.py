"""The images-in part of `python -m krea2_lite generate`: --image, --strength, --mask, --mask-blur,
--outpaint; the input files recorded in a PNG (--from-png finds and checks them by SHA-256); the
per-line image / mask / strength of a --prompts file. Every input is read and checked before the
model loads (images_in.prepare), so a bad one costs a second and writes nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .. import checks, images_in
from ..inpaint import cut_schedule
from ..errors import ArgumentError, ImageInputError, MetadataError

INPUT_KEYS = ("image", "mask", "strength", "mask_blur", "outpaint")
FLAGS = {"image": "--image", "mask": "--mask", "strength": "--strength", "mask_blur": "--mask-blur",
         "outpaint": "--outpaint"}


def add_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--image", metavar="FILE", help="start from this image (img2img; with --mask: inpainting; "
                     "with --outpaint: outpainting); width / height default to its size rounded to 16")
    gen.add_argument("--strength", type=float, help="how much of the schedule runs from the noised image, in "
                     "(0, 1] (default 0.6; 1.0 with --mask / --outpaint; 1.0 = text to image's pixels)")
    gen.add_argument("--mask", metavar="FILE", help="inpainting mask: white = repaint, black = keep (pixels outside "
                     "stay the input's exactly); same aspect ratio as --image")
    gen.add_argument("--mask-blur", type=float, metavar="PX", help="soften the mask edge (Gaussian sigma, pixels)")
    gen.add_argument("--outpaint", type=outpaint_argument, metavar="L,T,R,B", help="pad the image by these pixels "
                     "(left, top, right, bottom) and paint the new area")


def outpaint_argument(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        sides = tuple(int(p) for p in parts)
    except ValueError:
        sides = ()
    if len(sides) != 4 or min(sides) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected four pixel counts ≥ 0, LEFT,TOP,RIGHT,BOTTOM")
    return sides


def from_png(meta: dict, path: str) -> dict:
    """The images-in settings a PNG recorded: {strength, mask_blur, outpaint, _image_record, _mask_record}."""
    if meta.get("strength") is None:
        stray = [k for k in ("image", "mask", "outpaint") if meta.get(k) is not None]
        if stray:  # an input recorded without its strength: not silently made text-to-image
            raise MetadataError(f"{path}: the krea2_lite metadata records {', '.join(stray)} but no strength")
        return {}
    try:  # the recorded values, checked as the flags would be, the PNG named
        out = {"strength": checks.check_number("strength", meta["strength"], 0.0, 1.0, low_open=True),
               "mask_blur": checks.check_number("mask_blur", meta.get("mask_blur") or 0, 0.0, images_in.MAX_MASK_BLUR)}
        if meta.get("outpaint") is not None:
            out["outpaint"] = images_in.check_outpaint(meta["outpaint"])
    except ArgumentError as exc:
        raise MetadataError(f"{path}: in the krea2_lite metadata, {exc}") from None
    for key in ("image", "mask"):
        record = meta.get(key)
        if record is not None and not (isinstance(record, dict) and isinstance(record.get("path"), str)
                                       and isinstance(record.get("sha256"), str)):
            raise MetadataError(f"{path}: '{key}' in the krea2_lite metadata must be {{path, sha256}}")
        out[f"_{key}_record"] = record
    out["_png"] = path
    return out


def given(args: argparse.Namespace) -> dict:
    """The flags given (None = not given)."""
    return dict(image=args.image, mask=args.mask, strength=args.strength, mask_blur=args.mask_blur,
                outpaint=args.outpaint)


def _find(record: dict, flag_value: str | None, png: str, key: str) -> str:
    """The file to use for a recorded input: the flag's, else the recorded path (or beside the PNG);
    its SHA-256 must match the record."""
    flag = "--image" if key == "image" else "--mask"
    candidates = [flag_value] if flag_value else [record["path"], str(Path(png).parent / Path(record["path"]).name)]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None and flag_value:
        raise ImageInputError(f"{flag} {flag_value}: no such file ({png} was made from {record['path']})")
    if found is None:
        raise ImageInputError(f"{png} was made from the {key} {record['path']}, which is missing; pass {flag} FILE")
    if images_in.file_record(found)["sha256"] != record["sha256"]:
        raise ImageInputError(f"{png} was made from the {key} {record['path']}, but {found} has changed (SHA-256 "
                              f"differs); pass {flag} with the original file")
    return found


def resolve(call: dict, flags: dict) -> None:
    """Merge --from-png's recorded inputs (in `call`) with the flags, checking recorded files by hash."""
    png = call.pop("_png", None)
    records = {key: call.pop(f"_{key}_record", None) for key in ("image", "mask")}
    for key, value in flags.items():
        if value is not None:
            call[key] = value
    if png is None:
        return
    if records["image"] is None and flags["image"] is None:
        raise ImageInputError(f"{png} was made from an image given in memory (no file recorded); pass --image FILE")
    for key, record in records.items():
        if record is not None:
            call[key] = _find(record, flags[key], png, key)


def check_job(job: dict) -> None:
    """Read and check a job's inputs now (before the model loads): files, sizes, mask, strength, steps."""
    if not any(job.get(k) is not None for k in INPUT_KEYS):
        return
    if job.get("image") is None:  # said in the CLI's words (the pipeline would name its keywords)
        given = [FLAGS[k] for k in ("mask", "strength", "mask_blur", "outpaint") if job.get(k) is not None]
        raise ImageInputError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} an input image: pass "
                              "--image FILE (or set \"image\" on the prompt line)")
    prepared, _, _ = images_in.prepare(job.get("image"), mask_image=job.get("mask"), outpaint=job.get("outpaint"),
                                       strength=job.get("strength"), mask_blur=job.get("mask_blur") or 0,
                                       width=job.get("width"), height=job.get("height"),
                                       total=job.get("num_images", 1))
    if job.get("steps") is not None and prepared is not None:
        cut_schedule(torch.zeros(job["steps"] + 1), prepared.strength)


def call_kwargs(job: dict) -> dict:
    """The pipeline's images-in keywords of a job."""
    return dict(image=job.get("image"), mask_image=job.get("mask"), strength=job.get("strength"),
                mask_blur=job.get("mask_blur") or 0, outpaint=job.get("outpaint"))


def input_files(args: argparse.Namespace, jobs: list[dict]) -> list[str]:
    """Every input image / mask file of the run (an output may never replace one)."""
    files = [f for f in (args.image, args.mask) if f]
    return files + [job[k] for job in jobs for k in ("image", "mask") if isinstance(job.get(k), str)]
