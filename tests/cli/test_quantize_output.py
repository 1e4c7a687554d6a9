"""Reliability battery, quantize output paths: --out may not be, contain or lie inside the source
(symlinks followed), nor be `.`, `~`, `""` or a root; --force replaces only an earlier krea2_lite
output or an empty folder; SIGINT / SIGTERM remove the partial folder. Also: --include of linears
with a bias, and quantized folders keeping the source folder's own defaults."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from krea2_lite.loading.transformer import load_transformer
from krea2_lite.pipeline import Krea2Pipeline
from krea2_lite.quantize import QuantizedLinear
from krea2_lite.cli import quantize as quantize_cli
from reliability_fixtures import copy_of, pipeline_folder, snapshot


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build the shared folder outside any test's captured stderr (it prints a progress bar)."""
    return pipeline_folder()


@pytest.fixture
def parent(tmp_path):
    """tmp/parent/{src (a transformer folder), notes.txt}: the user's data around the source."""
    root = tmp_path / "parent"
    copy_of(pipeline_folder() / "transformer", root / "src")
    (root / "notes.txt").write_text("not a model")
    return root


def quantize(*args) -> int:
    return quantize_cli.main(["--dtype", "int8", "--quiet", *map(str, args)])


def _refused(capsys, parent, *args, match: str):
    before = snapshot(parent.parent)
    assert quantize("--model", parent / "src", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert snapshot(parent.parent) == before  # nothing removed, nothing left behind


def test_out_containing_the_source_is_refused_even_with_force(parent, capsys):
    _refused(capsys, parent, "--out", parent, "--force", match="is or contains --model")


def test_out_equal_to_the_source(parent, capsys):
    _refused(capsys, parent, "--out", parent / "src", "--force", match="is or contains --model")


def test_out_inside_the_source(parent, capsys):
    _refused(capsys, parent, "--out", parent / "src" / "q", match="lies inside --model")


def test_out_through_a_symlink_to_the_source_parent(parent, capsys):
    (parent.parent / "alias").symlink_to(parent, target_is_directory=True)
    _refused(capsys, parent, "--out", parent.parent / "alias", "--force", match="is or contains --model")


def test_out_through_a_symlinked_source(parent, capsys, tmp_path):
    (tmp_path / "link").symlink_to(parent / "src", target_is_directory=True)
    before = snapshot(parent)
    assert quantize("--model", tmp_path / "link", "--out", parent, "--force") == 2
    assert "is or contains --model" in capsys.readouterr().err
    assert snapshot(parent) == before


@pytest.mark.parametrize("out, match", [(".", "the working folder"), ("", "--out is empty"),
                                        ("~", "the home folder"), ("/", "filesystem root")])
def test_dot_empty_home_and_root_are_refused(parent, capsys, monkeypatch, out, match):
    home = parent.parent / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = parent.parent / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _refused(capsys, parent, "--out", out, "--force", match=match)


def test_force_never_removes_a_folder_krea2_lite_did_not_write(parent, capsys):
    mine = parent.parent / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff\xd8 a photo")
    _refused(capsys, parent, "--out", mine, "--force", match="was not written by krea2_lite.quantize")


def test_force_never_replaces_a_file(parent, capsys):
    target = parent.parent / "q"
    target.write_text("a file the user keeps")
    _refused(capsys, parent, "--out", target, "--force", match="exists and is not a folder")
    assert not list(parent.parent.glob(".q.old-*"))


def test_force_replaces_an_empty_folder(parent, capsys):
    out = parent.parent / "q"
    out.mkdir()
    assert quantize("--model", parent / "src", "--out", out, "--force") == 0
    assert (out / "krea2_lite.json").is_file()
    assert sorted(p.name for p in parent.parent.iterdir()) == ["parent", "q"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_removes_the_partial_folder(parent, capsys, monkeypatch, signum):
    real = quantize_cli.write_transformer

    def interrupted(*args, **kwargs):
        result = real(*args, **kwargs)  # the partial folder now holds data
        assert list(parent.parent.glob(".q.partial-*"))
        signal.raise_signal(signum)
        return result

    monkeypatch.setattr(quantize_cli, "write_transformer", interrupted)
    # A shell starts background jobs (`pytest &`, nohup) with SIGINT ignored, and Python keeps that;
    # give this test the interactive Ctrl-C behaviour it is about, and put back what was there.
    saved_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        handler = signal.getsignal(signal.SIGTERM)
        before = snapshot(parent)
        assert quantize("--model", parent / "src", "--out", parent.parent / "q") == 130
        assert capsys.readouterr().err == "error: interrupted\n"
        assert sorted(p.name for p in parent.parent.iterdir()) == ["parent"]
        assert snapshot(parent) == before
        assert signal.getsignal(signal.SIGTERM) is handler  # restored
    finally:
        signal.signal(signal.SIGINT, saved_int)


def test_sigterm_to_a_running_quantizer_leaves_nothing(tmp_path):
    from safetensors.torch import save_file

    from krea2_lite import Krea2Config, Krea2Transformer

    config = Krea2Config(features=768, tdim=256, txtdim=256, heads=6, kvheads=2, layers=3, txtheads=4,
                         txtkvheads=4, txtlayers=4, channels=16)
    src = tmp_path / "src.safetensors"
    save_file({k: v.contiguous() for k, v in Krea2Transformer(config).state_dict().items()}, str(src))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "krea2_lite.quantize", "--model", str(src), "--dtype", "int4",
                             "--out", str(tmp_path / "out"), "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None:
        time.sleep(0.01)
    assert list(tmp_path.glob(".out.partial-*")), "the quantizer never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


@pytest.mark.parametrize("include, layer", [("first", "first"), ("tmlp.*", "tmlp.0"), ("*", "first")])
def test_include_linears_with_a_bias(parent, include, layer):
    out = parent.parent / "q"
    assert quantize("--model", parent / "src", "--out", out, "--include", include) == 0
    model = load_transformer(out, dtype=torch.float32)
    module = model.get_submodule(layer)
    reference = load_transformer(parent / "src", dtype=torch.float32).get_submodule(layer)
    assert isinstance(module, QuantizedLinear) and module.bias is not None
    assert torch.equal(module.bias.float(), reference.bias.bfloat16().float())  # stored in the bf16 compute dtype
    assert torch.allclose(module.dequantize(), reference.weight, atol=reference.weight.abs().max().item() / 100)


def test_quantized_pipeline_keeps_the_source_defaults(tmp_path):
    out = tmp_path / "q"
    assert quantize("--model", pipeline_folder(), "--out", out, "--text-encoder-dtype", "none") == 0
    pipe = Krea2Pipeline.from_pretrained(out, device="cpu", dtype=torch.float32, progress=False)
    source = Krea2Pipeline.from_pretrained(pipeline_folder(), device="cpu", dtype=torch.float32, progress=False)
    assert (pipe.defaults, pipe.default_size) == (source.defaults, source.default_size)
    assert (pipe.defaults.steps, pipe.default_size) == (3, (32, 32))
