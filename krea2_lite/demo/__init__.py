"""The demo model: a trained miniature Krea 2 shipped with the package.

`Krea2Pipeline.from_pretrained("demo")` and `python -m krea2_lite generate PROMPT --model demo`
load the folder returned by `demo_path()`: a diffusers-layout pipeline (model_index.json,
transformer/, text_encoder/, tokenizer/, vae/, scheduler/) with the real architectures at toy
sizes, trained on procedural 64×64 scenes ("a small red circle at the top left on a blue
background") by `python -m krea2_lite.demo.train`. `dataset` draws the scenes, `classifier`
reads colour / position / size / shape back from an image without any learned model.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointNotFoundError

MODEL_DIR = Path(__file__).resolve().parent / "model"


def demo_path() -> Path:
    """The shipped demo pipeline folder."""
    if not (MODEL_DIR / "model_index.json").is_file():
        raise CheckpointNotFoundError(
            f"{MODEL_DIR}: the demo model is missing from this installation; rebuild it with "
            f"`python -m krea2_lite.demo.train --out {MODEL_DIR}` (needs diffusers)")
    return MODEL_DIR
