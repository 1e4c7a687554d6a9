"""Shared helpers of the round-three reliability battery (issue 29)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from krea2_lite.cli import quantize as quantize_cli
from krea2_lite.cli.subcommands import main
from krea2_lite.pipeline import Krea2Pipeline
from reliability_fixtures import copy_of, pipeline_folder, snapshot

FAST = ["--model", "demo", "--steps", "2", "--device", "cpu", "--quiet"]


def dead_pid() -> int:
    """The pid of a process that has exited (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def one_error_line(capsys, match: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    return err


@pytest.fixture(scope="module", autouse=True)
def built_pipeline():
    """Build the shared tiny pipeline outside any test's captured stderr (it prints a progress bar)."""
    return pipeline_folder()


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if the model would be loaded (every check must come first)."""
    calls = []

    def refuse(cls, *args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(Krea2Pipeline, "from_pretrained", classmethod(refuse))
    return calls


def generate_refused(capsys, folder: Path, argv: list[str], match: str) -> str:
    """generate exits 2 with one `error:` line holding `match`; `folder` is unchanged."""
    before = snapshot(folder)
    assert main(["generate", *argv]) == 2
    err = one_error_line(capsys, match)
    assert snapshot(folder) == before
    return err


def quantize(*args) -> int:
    return quantize_cli.main(["--quiet", *map(str, args)])


def quantize_refused(capsys, folder: Path, *args, match: str) -> str:
    before = snapshot(folder)
    assert quantize(*args) == 2
    err = one_error_line(capsys, match)
    assert snapshot(folder) == before
    return err


def source_transformer(tmp_path: Path) -> Path:
    return copy_of(pipeline_folder() / "transformer", tmp_path / "src")


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path
