"""A batch job's work list: one job per prompt-file line (one pipeline call, as the single-process
`generate --prompts` makes it), each image with its run-wide index, file name and request.

A line's image k is made by the same call the single-process run makes (prompt, seed, num_images,
…), so its pixels are the same bits whichever worker makes it and in whatever order.
"""

from __future__ import annotations

import json
import os

from .. import checks
from ..cli.generate_outputs import FOLDER_PATTERN
from ..errors import PromptFileError

# The single-process CLI's file names when --output is a folder: a batch job writes the same names.
FILE_PATTERN = FOLDER_PATTERN
JOB_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "mu", "width", "height", "num_images",
            "max_sequence_length", "cache", "strength", "mask_blur", "outpaint")


def read_prompts(path: str) -> list[dict]:
    """The prompt file's lines, by the single-process rules (.txt / .jsonl, PromptFileError per line)."""
    from ..cli.prompt_files import read_prompt_file  # the one place that names the prompt reader's module

    return read_prompt_file(path)


def jobs_from_file(path: str, defaults: dict) -> list[dict]:
    """`defaults` (seed, steps, …) overridden by each line, checked before anything loads."""
    defaults = {"seed": 0, "num_images": 1, **{k: v for k, v in defaults.items() if v is not None}}
    jobs = [{**defaults, **line} for line in read_prompts(path)]
    check_jobs(jobs, path)
    return jobs


def check_jobs(jobs: list[dict], source: str | None) -> None:
    """The model-independent bounds of every job (the CLI's checks); a prompt-file line is named."""
    for job in jobs:
        try:
            checks.check_call_settings(steps=job.get("steps"), guidance=job.get("guidance"), mu=job.get("mu"),
                                       num_images=job["num_images"], seed=job["seed"], width=job.get("width"),
                                       height=job.get("height"))
        except (ValueError, TypeError) as exc:
            if "line" not in job or source is None:
                raise
            raise PromptFileError(f"{source}:{job['line']}: {exc}") from exc


def load_key(load: dict) -> dict:
    """The load settings as plain JSON (a QuantSpec becomes its dict), for requests and workers."""
    quant = load.get("quant")
    if quant is not None and not isinstance(quant, str):
        quant = quant.to_dict()
    return dict(model=str(load["model"]), variant=load.get("variant"), dtype=load.get("dtype"), quant=quant,
                loras=[[str(path), float(scale)] for path, scale in load.get("lora", [])],
                text_encoder=load.get("text_encoder"), vae=load.get("vae"), transformer=load.get("transformer"),
                revision=load.get("revision"))


def _input_record(path) -> dict:
    from ..images_in import file_record

    record = file_record(os.fspath(path))
    return dict(record, path=os.path.abspath(os.fspath(path)))  # workers may run in another folder


def plan_images(jobs: list[dict], load: dict, stem: str, metadata: bool) -> list[dict]:
    """One entry per job: {"job": call settings, "images": [{index, file, request}, …]}.

    `request` is everything that decides an image's bytes; the manifest stores it, and a re-run
    keeps an image only when its stored request equals the new one.
    """
    key = load_key(load)
    planned, index = [], 0
    for job in jobs:
        call = {k: job.get(k) for k in JOB_KEYS}
        for key in ("image", "mask"):  # input files by path and SHA-256: a changed input is a new request
            if job.get(key) is not None:
                call[f"input_{key}"] = _input_record(job[key])
        images = []
        for k in range(job["num_images"]):
            request = dict(call, image=k, load=key, metadata=metadata)
            images.append(dict(index=index, line=job.get("line"), file=FILE_PATTERN.format(stem=stem, index=index),
                               request=json.loads(json.dumps(request))))
            index += 1
        planned.append(dict(job=call, images=images))
    return planned
