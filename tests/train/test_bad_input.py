"""Bad input: one clear line each (exit 2 from the CLI), before any model loads where possible;
a NaN loss stops naming its step; Ctrl-C saves the last completed step and exits 130."""

from __future__ import annotations

import pytest

from krea2_lite.cli.train import main
from krea2_lite.demo import demo_path
from krea2_lite.errors import ArgumentError, NonFiniteError
from krea2_lite.train import TrainingInterrupted, train_lora
from krea2_lite.train.data import bucket_for, buckets, scan_folder

from test_train_demo import OPTIONS, write_scene_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_scene_folder(tmp_path_factory.mktemp("bad") / "data", 2)


CASES = {
    "rank 0": (["--rank", "0"], "rank must be an integer ≥ 1"),
    "rank over layer": (["--rank", "4096", "--resolution", "64"], "exceeds layer"),
    "lr 0": (["--lr", "0"], "lr must be a finite number > 0"),
    "lr nan": (["--lr", "nan"], "lr must be a finite number > 0"),
    "steps 0": (["--steps", "0"], "steps must be an integer ≥ 1"),
    "resolution": (["--resolution", "100"], "multiple of 16"),
    "resolution huge": (["--resolution", "999999984"], "16..4096"),
    "targets": (["--targets", "attn,foo"], "targets must be a comma list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_arguments_one_line_exit_2(case, data, tmp_path, capsys):
    flags, message = CASES[case]
    code = main(["--model", str(demo_path()), "--data", str(data), "--output", str(tmp_path / "l.safetensors"),
                 "--quiet", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "l.safetensors").exists()


def test_output_over_an_input_and_missing_or_empty_data(data, tmp_path, capsys):
    assert main(["--model", str(demo_path()), "--data", str(data), "--output", str(data / "l.safetensors")]) == 2
    assert "inside the data folder" in capsys.readouterr().err
    target = demo_path() / "transformer" / "diffusion_pytorch_model.safetensors"
    assert main(["--model", str(demo_path()), "--data", str(data), "--output", str(target)]) == 2
    assert "overwrite the input --model" in capsys.readouterr().err
    assert main(["--model", str(demo_path()), "--data", str(tmp_path / "none"), "--output", "x.safetensors"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(demo_path()), "--data", str(tmp_path / "empty"), "--output",
                 str(tmp_path / "o" / "x.safetensors"), "--resolution", "64"]) == 2
    assert "nothing to train on" in capsys.readouterr().err


def test_folder_scan_captions_metadata_and_skips(tmp_path):
    data = write_scene_folder(tmp_path / "d", 3)
    (data / "img1.txt").write_bytes(b"\xff\xfe\x00binary")  # not text
    (data / "img2.txt").unlink()
    (data / "metadata.jsonl").write_text('{"file_name": "img2.png", "text": "from metadata"}\nnot json\n')
    items, skips = scan_folder(data, 64, trigger="zq")
    assert [(i.image.name, i.caption) for i in items] == [("img0.png", "zq a zorblat"), ("img2.png", "zq from metadata")]
    assert any("img1.txt: not UTF-8" in s for s in skips) and any("metadata.jsonl:2" in s for s in skips)


def test_too_small_images_only_is_an_error(tmp_path):
    data = write_scene_folder(tmp_path / "d", 1)
    with pytest.raises(ArgumentError, match="too small"):
        scan_folder(data, 256)


def test_buckets_are_multiples_of_16_near_the_area():
    for width, height in buckets(1024):
        assert width % 16 == 0 and height % 16 == 0 and width * height <= 1024 ** 2
        assert width * height >= 0.9 * 1024 ** 2 or min(width, height) < 300
    assert bucket_for((1024, 1024), 1024) == (1024, 1024)
    w, h = bucket_for((1920, 1080), 1024)
    assert abs(w / h - 16 / 9) < 0.05


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_save(data, tmp_path, monkeypatch):
    import krea2_lite.train.loop as loop

    real = loop.flow_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loop, "flow_loss", flaky)
    out = tmp_path / "o" / "l.safetensors"
    with pytest.raises(NonFiniteError, match="at step 3.*last good save is step 2"):
        train_lora(str(demo_path()), data=data, output=out, steps=5, save_every=2, cache_dir=tmp_path / "c", **OPTIONS)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["krea2_lite.step"] == "2"


def test_ctrl_c_saves_the_last_step_and_exits_130(data, tmp_path, monkeypatch, capsys):
    import krea2_lite.train.loop as loop

    real = loop.train_step

    def interrupted(run):
        if run.step == 2:
            raise KeyboardInterrupt
        return real(run)

    monkeypatch.setattr(loop, "train_step", interrupted)
    out = tmp_path / "o" / "l.safetensors"
    code = main(["--model", str(demo_path()), "--data", str(data), "--output", str(out), "--quiet", "--rank", "2",
                 "--resolution", "64", "--steps", "5", "--cache-dir", str(tmp_path / "c")])
    assert code == 130 and "saved step 2" in capsys.readouterr().err
    assert (tmp_path / "o" / "l.safetensors.checkpoint" / "state.json").is_file()
    import json

    assert json.loads((tmp_path / "o" / "l.safetensors.checkpoint" / "state.json").read_text())["step"] == 2
