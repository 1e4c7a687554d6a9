"""Where a training run writes, checked against what it reads, before anything loads.

A run writes the LoRA (`--output`), its loss curve (`STEM.loss.jsonl`, `STEM.loss.png`), the
checkpoint folder (`OUTPUT.checkpoint`, replaced at every save), sample images (`STEM-samples/`)
and the latent / text cache (`--cache-dir`). None of these may be, or lie inside, something the run
reads (the data folder, the model and component paths, the sample prompt file, the `--resume`
folder) or another run's checkpoint folder; and the checkpoint folder it replaces must be one a
training run wrote (its `state.json` inside), never a user's folder or file. Each refusal is one
`UnsafeOutputError` naming both paths.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UnsafeOutputError
from ..files.leftovers import remove_dead_leftovers

CHECKPOINT_MARK = "state.json"  # every checkpoint folder holds it (train/checkpoint.py)


def is_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and (folder / CHECKPOINT_MARK).is_file()


def written_paths(settings) -> dict[str, Path]:
    from .loss_log import log_paths
    from .samples import sample_dir

    output = Path(settings.output)
    jsonl, png = log_paths(output)
    paths = {"--output": output, "the loss log": jsonl, "the loss plot": png,
             "the checkpoint folder": settings.checkpoint_path, "--cache-dir": settings.cache_path}
    if settings.sample_prompts is not None:
        paths["the samples folder"] = sample_dir(output)
    return paths


def read_paths(settings) -> dict[str, Path]:
    names = {"--data": settings.data, "--model": settings.model, "--transformer": settings.transformer,
             "--text-encoder": settings.text_encoder, "--vae": settings.vae,
             "--sample-prompts": settings.sample_prompts, "--resume": settings.resume}
    return {flag: Path(value) for flag, value in names.items() if value and Path(value).exists()}


def _checkpoint_ancestor(path: Path, itself: bool) -> Path | None:
    path = path.resolve()
    for folder in ([path] if itself else []) + list(path.parents):
        if is_checkpoint(folder):
            return folder
    return None


def _overlap(what: str, path: Path, flag: str, source: Path) -> str | None:
    """How a written `path` meets an input `source` ("over", "inside", "around"), or None."""
    if what == "the checkpoint folder" and flag == "--resume":
        return None  # resuming from the run's own checkpoint, which its saves replace: the usual case
    if path.resolve() == source.resolve():
        return "over"
    if source.resolve() in path.resolve().parents:
        return "inside"
    if what == "the checkpoint folder" and path.resolve() in source.resolve().parents:
        return "around"  # a save replaces the folder whole, with the input in it
    return None


def check_run_paths(settings) -> None:
    """Every path the run writes is clear of its inputs and of checkpoint folders (module doc)."""
    reads = read_paths(settings)
    for what, path in written_paths(settings).items():
        for flag, source in reads.items():
            how = _overlap(what, path, flag, source)
            if how is not None:
                raise UnsafeOutputError(f"{what} {path} would be written {how} the input {flag} {source}; "
                                        "choose another --output / --cache-dir")
        inside = _checkpoint_ancestor(path, itself=what != "the checkpoint folder")
        if inside is not None:
            raise UnsafeOutputError(f"{what} {path} lies inside the training checkpoint {inside}, which a save "
                                    "replaces whole; write it elsewhere")
    checkpoint = settings.checkpoint_path
    if (checkpoint.exists() or checkpoint.is_symlink()) and not is_checkpoint(checkpoint):
        raise UnsafeOutputError(f"the checkpoint folder {checkpoint} exists and is not a training checkpoint (no "
                                f"{CHECKPOINT_MARK}); a save would replace it: move it or choose another --output")


def remove_leftovers(settings) -> None:
    """Temporary files and folders of killed runs (`.NAME….partial-PID`, the process gone) beside the outputs."""
    folders = {Path(settings.output).parent, settings.checkpoint_path.parent, settings.cache_path / "latents",
               settings.cache_path / "text"}
    for folder in folders:
        remove_dead_leftovers(folder)
