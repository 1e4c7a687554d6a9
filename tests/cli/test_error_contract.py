"""Reliability battery, command lines and the order of checks: every user-caused error is one
`error: …` line with exit status 2 (krea2_lite/cli/error_contract.py), tracebacks only with
KREA2_LITE_DEBUG=1; what the user named is checked before defaults are resolved or downloaded."""

import os
import subprocess
import sys

import pytest
import torch

from krea2_lite.cli import subcommands as generate_cli
from krea2_lite.cli.error_contract import run_cli
from krea2_lite.errors import CheckpointNotFoundError, UnsafeCheckpointFormatError
from krea2_lite.pipeline import Krea2Pipeline
from krea2_lite.cli import quantize as quantize_cli
from reliability_fixtures import copy_of, official_file, pipeline_folder, snapshot


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build the shared folder outside any test's captured stderr (it prints a progress bar)."""
    return pipeline_folder()


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to resolve a default from the Hugging Face hub fails the test."""
    import huggingface_hub

    def refuse(repo_id, *args, **kwargs):
        raise AssertionError(f"tried to download {repo_id} before checking what the user named")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def _one_error_line(capsys, *needles) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in captured.err, captured.err
    return captured.err


def generate(*args) -> int:
    return generate_cli.main(["generate", "a cat", "--quiet", *map(str, args)])


def test_unknown_device_is_one_line(capsys):
    assert generate("--model", pipeline_folder(), "--device", "bogus") == 2
    _one_error_line(capsys, "device must be 'cpu', 'cuda' or 'cuda:N', got 'bogus'")


def test_infinite_vram_budget_is_one_line(capsys):
    assert generate("--model", pipeline_folder(), "--vram-gb", "inf") == 2
    _one_error_line(capsys, "vram_gb must be a finite number")


def test_pickle_model_is_named_before_any_default_is_fetched(tmp_path, capsys, no_hub):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04 not opened")
    before = snapshot(tmp_path)
    assert generate("--model", tmp_path / "model.pt") == 2
    _one_error_line(capsys, "model.pt", "pickle-based")
    assert snapshot(tmp_path) == before
    with pytest.raises(UnsafeCheckpointFormatError):
        Krea2Pipeline.from_pretrained(tmp_path / "model.pt", device="cpu")


def test_folder_without_model_index_is_named_before_any_default_is_fetched(tmp_path, no_hub):
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match=rf"{tmp_path}: no model found"):
        Krea2Pipeline.from_pretrained(tmp_path, device="cpu")


def test_transformer_file_is_checked_before_the_default_text_encoder(tmp_path, no_hub):
    state_file = official_file(tmp_path / "k.safetensors")
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(Exception, match=r"k\.safetensors: tensor .* truncated") as info:
        Krea2Pipeline.from_pretrained(state_file, device="cpu")
    assert "AssertionError" not in info.typename


def test_demo_with_a_local_demo_entry_loads_the_shipped_demo(tmp_path, monkeypatch):
    from krea2_lite import pipeline as pipeline_module
    from krea2_lite.demo import MODEL_DIR

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("my notes, not a model")
    seen = []

    def stop(path, **kwargs):
        seen.append(path)
        raise KeyboardInterrupt  # enough: we only want to see where the text encoder comes from

    monkeypatch.setattr(pipeline_module, "load_text_encoder", stop)
    with pytest.raises(KeyboardInterrupt):
        Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False)
    assert seen and MODEL_DIR in seen[0].parents
    assert (tmp_path / "demo").read_text() == "my notes, not a model"


def test_output_that_is_a_folder_is_one_line_and_leaves_no_temp_file(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "out.png"
    folder.mkdir()
    image = Image.new("RGB", (4, 4))
    from krea2_lite.metadata import save_png

    assert run_cli(lambda: save_png(image, folder)) == 2
    _one_error_line(capsys, "out.png")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_symlink_loop_beside_the_weights(tmp_path, capsys):
    src = copy_of(pipeline_folder() / "transformer", tmp_path / "src")
    (src / "loop.safetensors").symlink_to(src / "loop.safetensors")
    before = snapshot(tmp_path)
    assert quantize_cli.main(["--model", str(src), "--dtype", "int8", "--out", str(tmp_path / "q"), "--quiet"]) == 2
    _one_error_line(capsys, "loop.safetensors")
    assert snapshot(tmp_path) == before


def test_missing_quantize_source_is_one_line(tmp_path, capsys):
    assert quantize_cli.main(["--model", str(tmp_path / "nope"), "--dtype", "int8", "--out",
                              str(tmp_path / "q"), "--quiet"]) == 2
    _one_error_line(capsys, "nope: no such file or folder")
    assert list(tmp_path.iterdir()) == []


def test_internal_errors_are_one_line_with_status_1(capsys):
    def bug():
        raise RuntimeError("shapes (3, 4) and (5, 6) cannot be multiplied")

    assert run_cli(bug) == 1
    _one_error_line(capsys, "internal error RuntimeError", "KREA2_LITE_DEBUG=1")


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("KREA2_LITE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_cli(lambda: open("/nonexistent/krea2_lite/file"))


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~10 s alone, 40 s on a busy machine
def test_the_real_command_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("KREA2_LITE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "krea2_lite", "generate", "a cat", "--model",
                           str(tmp_path / "missing"), "--seed", "0"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or folder"]
