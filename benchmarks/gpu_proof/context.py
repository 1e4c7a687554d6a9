"""The model shape a proof run uses (shared by the runner and the quanto peer's child process)."""

from __future__ import annotations

from benchmarks.common import PRESETS
from krea2_lite import Krea2Config


def preset_config(preset: str) -> Krea2Config:
    """The model shape of a preset; the dry run's tiny model has one block (the Triton interpreter is slow)."""
    if preset == "tiny":
        return Krea2Config.tiny(layers=1)
    return PRESETS[preset]
