"""generate --image / --strength / --mask / --mask-blur / --outpaint on the demo model: metadata with
the inputs' names and SHA-256, --from-png reproduction, prompt-file lines, errors before the load."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from krea2_lite import read_png_metadata
from krea2_lite.cli.subcommands import main
from krea2_lite.images_in import file_record
from krea2_lite.pipeline import Krea2Pipeline

FAST = ["--model", "demo", "--steps", "4", "--device", "cpu", "--quiet"]


@pytest.fixture
def loads(monkeypatch, single_thread):
    calls = []
    real = Krea2Pipeline.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Krea2Pipeline, "from_pretrained", classmethod(counting))
    return calls


@pytest.fixture
def inputs(tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return image, tmp_path / "mask.png"


def test_inpaint_png_records_inputs_and_from_png_reproduces(tmp_path, inputs, loads, capsys):
    image, mask = inputs
    out = tmp_path / "out.png"
    assert main(["generate", "a blue circle", *FAST, "--image", str(image), "--mask", str(mask),
                 "--mask-blur", "1.5", "--strength", "0.9", "--output", str(out)]) == 0
    meta = read_png_metadata(out)
    assert meta["strength"] == 0.9 and meta["mask_blur"] == 1.5 and meta["outpaint"] is None
    assert meta["image"] == file_record(image) and meta["mask"] == file_record(mask)
    got = np.asarray(Image.open(out))
    assert np.array_equal(got[:8], np.asarray(Image.open(image))[:8])  # far outside the mask: the input's
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--device", "cpu", "--quiet", "--output", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), got)
    # A changed input: one line naming it, nothing written.
    Image.new("RGB", (64, 64), (0, 0, 0)).save(image)
    capsys.readouterr()
    loaded = len(loads)
    assert main(["generate", "--from-png", str(out), "--device", "cpu", "--quiet", "--output",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in.png" in err[0] and "changed" in err[0]
    mask.unlink()
    assert main(["generate", "--from-png", str(out), "--image", str(tmp_path / "none.png"), "--quiet",
                 "--output", str(tmp_path / "x.png")]) == 2
    assert "none.png" in capsys.readouterr().err
    assert len(loads) == loaded and not (tmp_path / "x.png").exists()


def test_outpaint_and_prompt_file_lines(tmp_path, inputs, loads, capsys):
    image, mask = inputs
    out = tmp_path / "wide.png"
    assert main(["generate", "a red square", *FAST, "--image", str(image), "--outpaint", "16,0,16,0",
                 "--output", str(out)]) == 0
    assert Image.open(out).size == (96, 64) and read_png_metadata(out)["outpaint"] == [16, 0, 16, 0]
    folder = tmp_path / "jobs"
    folder.mkdir()
    shutil.copy(image, folder / "a.png")
    lines = folder / "p.jsonl"
    lines.write_text(json.dumps({"prompt": "x", "image": "a.png", "strength": 0.5}) + "\n"
                     + json.dumps({"prompt": "y"}) + "\n")
    assert main(["generate", "--prompts", str(lines), *FAST, "--output", str(tmp_path / "o{index}.png")]) == 0
    first, second = read_png_metadata(tmp_path / "o0.png"), read_png_metadata(tmp_path / "o1.png")
    assert first["strength"] == 0.5 and first["image"]["sha256"] == file_record(image)["sha256"]
    assert second.get("strength") is None


@pytest.mark.parametrize("flags, message", [
    (["--image", "missing.png"], "missing.png"),
    (["--strength", "0.5"], "--strength needs an input image: pass --image FILE"),
    (["--mask", "{black}", "--outpaint", "1,0,0,0"], "--mask and --outpaint need an input image"),
    (["--image", "{img}", "--strength", "0"], "strength"),
    (["--image", "{img}", "--strength", "0.1"], "no step"),
    (["--image", "{img}", "--mask", "{black}"], "all black"),
    (["--image", "{img}", "--mask", "{tall}"], "aspect ratio"),
    (["--image", "{img}", "--outpaint", "1,2,3"], "LEFT,TOP,RIGHT,BOTTOM"),
    (["--image", "{img}", "--outpaint", "0,0,0,0"], "pads nothing"),
    (["--image", "{img}", "--output", "{img}"], "overwrite"),
    (["--image", "{bad}"], "cannot be read"),
])
def test_bad_inputs_one_line_exit_2_before_the_load(tmp_path, inputs, loads, capsys, flags, message):
    image, _ = inputs
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    Image.new("L", (32, 64), 255).save(tmp_path / "tall.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    names = dict(img=image, black=tmp_path / "black.png", tall=tmp_path / "tall.png", bad=tmp_path / "bad.png")
    argv = ["generate", "p", *FAST, "--output", str(tmp_path / "o.png")]
    argv += [f.format(**names) for f in flags]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) if "LEFT" in message else _nothing():
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and (len(err) == 1 or "usage" in err[0])
    assert not loads and sorted(p.name for p in tmp_path.iterdir()) == before


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
