"""Sample images during training: --sample-every N --sample-prompts FILE writes one PNG per prompt every N
steps and at the end, through the pipeline, with metadata naming the LoRA and its step; bad input is
one clear error before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from krea2_lite import read_png_metadata
from krea2_lite.cli.train import main
from krea2_lite.demo import demo_path
from krea2_lite.train import train_lora

from test_train_demo import OPTIONS, write_scene_folder


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    data = write_scene_folder(root / "data", 2)
    prompts = root / "prompts.txt"
    prompts.write_text("a zorblat\n\na blue circle at the top left\n")
    messages = []
    out = train_lora(str(demo_path()), data=data, output=root / "out" / "style.safetensors", steps=3,
                     sample_every=2, sample_prompts=str(prompts), cache_dir=root / "cache", max_sequence_length=64,
                     **{**OPTIONS, "lr": 2e-2, "log": messages.append})
    return out, messages


def test_samples_every_n_steps_and_at_the_end_with_lora_metadata(sampled):
    out, messages = sampled
    folder = out.with_name("style-samples")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step000002-00.png", "step000002-01.png", "step000003-00.png", "step000003-01.png"]
    meta = read_png_metadata(folder / "step000003-01.png")
    assert meta["prompt"] == "a blue circle at the top left"
    assert meta["loras"] == [{"name": "style", "scale": 1.0, "path": str(out.resolve()), "step": 3}]
    assert meta["training"] == {"step": 3, "steps": 3}
    assert meta["seed"] == OPTIONS["seed"] + 1 and meta["width"] == meta["height"] == 64
    assert meta["max_sequence_length"] == 64
    assert read_png_metadata(folder / "step000002-00.png")["loras"][0]["step"] == 2
    first = np.asarray(Image.open(folder / "step000002-00.png"), dtype=np.int16)
    last = np.asarray(Image.open(folder / "step000003-00.png"), dtype=np.int16)
    assert first.shape == (64, 64, 3) and np.abs(first - last).max() > 0  # same seed: the LoRA step changed it
    assert not list(folder.glob(".*"))  # no temporary file left
    assert sum("caption(s) with the text encoder" in m for m in messages) == 1  # prompts encoded with captions


def _cli(data, tmp_path, *flags):
    return main(["--model", str(demo_path()), "--data", str(data), "--output", str(tmp_path / "l.safetensors"),
                 "--quiet", "--resolution", "64", "--steps", "1", *flags])


@pytest.mark.parametrize("case", ["no prompts", "no every", "zero", "negative", "empty", "missing", "binary",
                                  "override"])
def test_bad_sample_flags_one_line_exit_2(case, tmp_path, capsys):
    data = write_scene_folder(tmp_path / "data", 1)
    good = tmp_path / "p.txt"
    good.write_text("a zorblat\n")
    files = {"empty": ("e.txt", b"\n\n"), "binary": ("b.txt", b"a\0b"), "override": ("o.jsonl", b'{"prompt": "x", "seed": 3}\n')}
    if case in files:
        name, content = files[case]
        (tmp_path / name).write_bytes(content)
    flags, message = {
        "no prompts": (["--sample-every", "2"], "--sample-every needs --sample-prompts"),
        "no every": (["--sample-prompts", str(good)], "--sample-prompts needs --sample-every"),
        "zero": (["--sample-every", "0", "--sample-prompts", str(good)], "sample_every must be an integer ≥ 1"),
        "negative": (["--sample-every", "-3", "--sample-prompts", str(good)], "sample_every must be an integer ≥ 1"),
        "empty": (["--sample-every", "1", "--sample-prompts", str(tmp_path / "e.txt")], "no prompts"),
        "missing": (["--sample-every", "1", "--sample-prompts", str(tmp_path / "nope.txt")], "cannot read"),
        "binary": (["--sample-every", "1", "--sample-prompts", str(tmp_path / "b.txt")], "NUL byte"),
        "override": (["--sample-every", "1", "--sample-prompts", str(tmp_path / "o.jsonl")], "take only"),
    }[case]
    code = _cli(data, tmp_path, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "l.safetensors").exists() and not (tmp_path / ".krea2_lite_train_cache").exists()


def test_the_last_sample_is_what_the_pipeline_draws_with_the_saved_lora(sampled):
    from krea2_lite import Krea2Pipeline

    out, _ = sampled
    pipe = Krea2Pipeline.from_pretrained(str(demo_path()), dtype=torch.float32)  # training computes in float32 on the CPU
    pipe.load_lora(out)
    want = np.asarray(pipe("a blue circle at the top left", seed=OPTIONS["seed"] + 1, width=64, height=64,
                           max_sequence_length=64, progress=False).images[0], dtype=np.int16)
    got = np.asarray(Image.open(out.with_name("style-samples") / "step000003-01.png"), dtype=np.int16)
    pipe.unload_lora()
    without = np.asarray(pipe("a blue circle at the top left", seed=OPTIONS["seed"] + 1, width=64, height=64,
                              max_sequence_length=64, progress=False).images[0], dtype=np.int16)
    assert np.abs(got - want).max() <= 1  # the LoRA hook (float32 F.linear) vs the inference hook (addmm): rounding
    assert np.abs(without - want).max() > 2 * np.abs(got - want).max()  # the LoRA visibly changes the image
