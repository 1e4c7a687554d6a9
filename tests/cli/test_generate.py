"""The generate CLI on the demo model: metadata in the PNGs, --from-png, --prompts, --output patterns,
every library quant string. In-process, so model loads can be counted."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from krea2_lite import QuantSpec, read_png_metadata
from krea2_lite.errors import MetadataError
from krea2_lite.cli.generate_settings import QUANTS
from krea2_lite.cli.subcommands import build_parser, main
from krea2_lite.pipeline import Krea2Pipeline
from krea2_lite.quantize.recipe import DTYPES, SHORTCUTS

FAST = ["--model", "demo", "--steps", "2", "--device", "cpu", "--quiet"]


@pytest.fixture
def loads(monkeypatch, single_thread):
    """Counts Krea2Pipeline.from_pretrained calls (and their arguments); the real loader runs."""
    calls = []
    real = Krea2Pipeline.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append((args, kwargs))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Krea2Pipeline, "from_pretrained", classmethod(counting))
    return calls


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_png_carries_settings_and_from_png_gives_identical_pixels(tmp_path, loads, capsys):
    first = tmp_path / "first.png"
    assert main(["generate", "a red circle on a blue background", *FAST, "--seed", "7", "--cfg", "3",
                 "--output", str(first)]) == 0
    meta = read_png_metadata(first)
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["guidance"], meta["model"], meta["dtype"]) == \
        ("a red circle on a blue background", 7, 2, 3.0, "demo", "fp32")
    with Image.open(first) as im:
        assert im.text["parameters"].splitlines()[-1].startswith("Steps: 2, CFG scale: 3, Seed: 7, Size: 64x64")

    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "--device", "cpu", "--quiet", "--output", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(first))
    assert read_png_metadata(again) == meta
    assert loads[1][0] == loads[0][0]  # the same model, dtype, quant and variant were asked for
    assert {k: loads[1][1][k] for k in ("dtype", "quant")} == {k: loads[0][1][k] for k in ("dtype", "quant")}

    varied = tmp_path / "varied.png"  # a flag given overrides the stored setting; the rest stays
    assert main(["generate", "--from-png", str(first), "--seed", "8", "--device", "cpu", "--quiet",
                 "--output", str(varied)]) == 0
    assert read_png_metadata(varied) == {**meta, "seed": 8}
    assert not np.array_equal(pixels(varied), pixels(first))
    assert capsys.readouterr().out.split() == [str(first), str(again), str(varied)]


def test_no_metadata(tmp_path, loads):
    out = tmp_path / "bare.png"
    assert main(["generate", "a green triangle", *FAST, "--no-metadata", "--output", str(out)]) == 0
    with Image.open(out) as im:
        assert "krea2_lite" not in im.text and "parameters" not in im.text


def test_three_line_prompt_file_loads_the_model_once(tmp_path, loads, capsys):
    prompts = tmp_path / "shapes.txt"
    lines = ["a red circle on a blue background", "a blue square on a green background",
             "a yellow triangle on a black background"]
    prompts.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line is skipped
    assert main(["generate", "--prompts", str(prompts), *FAST, "--seed", "4",
                 "--output", str(tmp_path / "out" / "{stem}-{index}-{seed}.png")]) == 0
    assert len(loads) == 1
    written = [tmp_path / "out" / f"shapes-{i}-4.png" for i in range(3)]  # every line starts at --seed
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    assert [read_png_metadata(p)["prompt"] for p in written] == lines


def test_jsonl_lines_override_and_folder_output(tmp_path, loads, capsys):
    prompts = tmp_path / "batch.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a red circle", "seed": 11, "size": "32x48", "cfg": 0},
        {"prompt": "a blue square", "negative_prompt": "green", "steps": 1, "num_images": 2},
    ]) + "\n")
    folder = tmp_path / "images"
    folder.mkdir()
    assert main(["generate", "--prompts", str(prompts), *FAST, "--seed", "2", "--output", str(folder)]) == 0
    assert len(loads) == 1
    paths = [folder / f"batch_{i:04d}.png" for i in range(3)]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    metas = [read_png_metadata(p) for p in paths]
    assert (metas[0]["seed"], metas[0]["width"], metas[0]["height"], metas[0]["guidance"], metas[0]["steps"]) == \
        (11, 32, 48, 0.0, 2)
    assert Image.open(paths[0]).size == (32, 48)
    assert [(m["seed"], m["steps"], m["negative_prompt"]) for m in metas[1:]] == [(2, 1, "green"), (3, 1, "green")]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "\n  \n", r"empty\.txt: no prompts"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', r"bad\.jsonl:2: bad JSON"),
    ("unknown.jsonl", '{"prompt": "a", "sede": 3}\n', r"unknown\.jsonl:1: unknown key 'sede'"),
    ("types.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "steps": "8"}\n', r"types\.jsonl:3: 'steps' must be a "
     "positive integer"),
    ("noprompt.jsonl", '{"seed": 1}\n', r"noprompt\.jsonl:1: 'prompt' must be a non-empty string"),
    ("list.json", '[{"prompt": "a"}]', r"list\.json: expected a \.txt file"),
])
def test_bad_prompt_files_fail_before_loading(tmp_path, loads, capsys, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    assert main(["generate", "--prompts", str(path), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert loads == []


def test_bad_inputs_name_what_is_wrong(tmp_path, loads, capsys):
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    cases = [
        (["generate", "--from-png", str(bare), "--quiet"], "bare.png: no krea2_lite metadata"),
        (["generate", "--prompts", str(tmp_path / "missing.txt"), *FAST], "missing.txt: cannot read"),
        (["generate", *FAST], "a prompt is needed"),
        (["generate", "--steps", "2"], "--model is required"),
        (["generate", "x", *FAST, "--output", str(tmp_path / "{name}.png")], "unknown placeholder {name}"),
        (["generate", "x", *FAST, "--num-images", "2", "--output", str(tmp_path / "{seed}_{stem}.png"),
          "--seed", "1"], None),
    ]
    for argv, message in cases:
        assert main(argv) == (0 if message is None else 2), argv
        err = capsys.readouterr().err.strip()
        if message is not None:
            assert len(err.splitlines()) == 1 and message in err, err
    lines = tmp_path / "same.txt"
    lines.write_text("a\nb\n")
    assert main(["generate", "--prompts", str(lines), *FAST, "--output", str(tmp_path / "{seed}.png")]) == 2
    assert "names" in capsys.readouterr().err  # both lines start at seed 0: one path for two images
    assert len(loads) == 1  # only the valid case loaded a model


def test_from_png_never_overwrites_its_source(tmp_path, loads, capsys):
    src = tmp_path / "src.png"
    assert main(["generate", "a red circle", *FAST, "--output", str(src)]) == 0
    before = src.read_bytes()
    assert main(["generate", "--from-png", str(src), "--quiet", "--output", str(src)]) == 2
    assert "would overwrite the input file" in capsys.readouterr().err and src.read_bytes() == before


def test_quant_choices_are_the_librarys():
    assert set(QUANTS) == set(DTYPES) | set(SHORTCUTS)
    for name in QUANTS:
        QuantSpec.parse(name)
        assert build_parser().parse_args(["generate", "p", "--model", "m", "--quant", name]).quant == name


def test_int4_png_records_its_rounding_and_older_pngs_read_as_min_max(tmp_path, loads):
    from krea2_lite import save_png
    from krea2_lite.cli.generate_settings import png_settings

    first, again = tmp_path / "int4.png", tmp_path / "again.png"
    assert main(["generate", "a red circle on a blue background", *FAST, "--quant", "int4",
                 "--output", str(first)]) == 0
    meta = read_png_metadata(first)
    assert meta["quant"]["dtype"] == "int4" and meta["quant"]["rounding"] == "mse-clip"
    assert main(["generate", "--from-png", str(first), "--device", "cpu", "--quiet", "--output", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(first))
    assert loads[1][1]["quant"] == QuantSpec("int4")

    older = tmp_path / "older.png"  # as krea2_lite wrote int4 images before the clip search
    with Image.open(first) as im:
        save_png(im.convert("RGB"), older, {**meta, "quant": "int4"})
    assert png_settings(str(older))[1]["quant"] == QuantSpec("int4", rounding="minmax")
    save_png(Image.new("RGB", (8, 8)), older, {**meta, "quant": "int4-lr0"})
    with pytest.raises(MetadataError, match=r"older\.png: the quant recipe .* not valid"):
        png_settings(str(older))


def test_quant_int8_w8a8_rot_runs(tmp_path, loads):
    out = tmp_path / "w8a8.png"
    assert main(["generate", "a red circle on a blue background", *FAST, "--quant", "int8-w8a8-rot",
                 "--output", str(out)]) == 0
    assert loads[0][1]["quant"] == "int8-w8a8-rot"
    assert read_png_metadata(out)["quant"] == "int8-w8a8-rot"
    assert Image.open(out).size == (64, 64)


def test_a_setting_the_pipeline_refuses_names_its_line(tmp_path, loads, capsys):
    path = tmp_path / "wide.jsonl"
    path.write_text('\n{"prompt": "a red circle", "width": 5000}\n')
    assert main(["generate", "--prompts", str(path), *FAST, "--output", str(tmp_path / "x_{index}.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wide.jsonl:2: width must be in 1..4096" in err, err
    assert not list(tmp_path.glob("x_*.png"))
    assert loads == []  # refused before the model loaded


@pytest.mark.parametrize("flags, message", [
    (["--steps", "5000"], "steps must be in 1..1000, got 5000"),
    (["--cfg", "1e9"], "guidance must be a finite number in [0.0, 100.0]"),
    (["--seed", "-1"], "seed must be in 0.."),
    (["--num-images", "65"], "num_images must be in 1..64"),
    (["--mu", "50"], "mu must be a finite number in [-20.0, 20.0]"),
    (["--width", "8192"], "width must be in 1..4096"),
])
def test_out_of_range_flags_fail_before_the_model_loads(tmp_path, loads, capsys, flags, message):
    assert main(["generate", "a red circle", *FAST, *flags, "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert loads == [] and not (tmp_path / "x.png").exists()
