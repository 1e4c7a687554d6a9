"""krea2_lite.metadata: the PNG text chunks, their round trip, atomic writes that honour the umask."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from krea2_lite import QuantSpec, read_png_metadata, save_png
from krea2_lite.errors import MetadataError
from krea2_lite.metadata import FIELDS, format_parameters, quant_label

META = dict(prompt="a fox, in snow", negative_prompt="blurry", seed=3, steps=8, guidance=0.0, mu=1.15, width=1024,
            height=768, model="krea/Krea-2-Turbo", variant="turbo", quant="int8",
            loras=[dict(name="C:/loras/style.safetensors", scale=0.8)], dtype="bf16", version="0.1.0")


def image():
    return Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))


def test_parameters_text_is_a1111_style():
    text = format_parameters(META)
    prompt, negative, settings = text.split("\n")
    assert prompt == "a fox, in snow" and negative == "Negative prompt: blurry"
    assert settings.startswith("Steps: 8, CFG scale: 0, Seed: 3, Size: 1024x768, Model: krea/Krea-2-Turbo, "
                               "Variant: turbo, Quant: int8, Mu: 1.15, Dtype: bf16, ")
    # values holding ':' or ',' are JSON-quoted, as A1111 does, so the line still splits on ", "
    assert 'LoRA: "C:/loras/style.safetensors:0.8"' in settings and settings.endswith("krea2_lite: 0.1.0")
    no_negative = format_parameters({**META, "negative_prompt": None, "mu": None, "quant": None, "loras": []})
    assert "Negative prompt" not in no_negative and "Mu:" not in no_negative and "Quant:" not in no_negative


def test_save_and_read_back(tmp_path):
    path = save_png(image(), tmp_path / "sub" / "x.png", META)
    assert read_png_metadata(path) == META
    with Image.open(path) as im:
        assert im.text["parameters"] == format_parameters(META)
        assert json.loads(im.text["krea2_lite"]) == META
        assert np.array_equal(np.asarray(im), np.asarray(image()))
    plain = save_png(image(), tmp_path / "plain.png")
    with Image.open(plain) as im:
        assert "krea2_lite" not in im.text and "parameters" not in im.text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_mode_follows_the_umask_and_no_temporary_is_left(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_png(image(), tmp_path / "x.png", META)
        save_png(image(), path, META)  # replacing keeps the write atomic and the mode umask-derived
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def save(self, fh, **kwargs):
            fh.write(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_png(Broken(), tmp_path / "x.png", META)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_metadata_names_the_file(tmp_path):
    bare = tmp_path / "bare.png"
    image().save(bare)
    with pytest.raises(MetadataError, match=r"bare\.png: no krea2_lite metadata"):
        read_png_metadata(bare)
    other = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20")
    image().save(other, pnginfo=info)
    with pytest.raises(MetadataError, match=r"a1111\.png: no krea2_lite metadata \(it has an A1111"):
        read_png_metadata(other)
    broken = tmp_path / "broken.png"
    info = PngInfo()
    info.add_text("krea2_lite", "{not json")
    image().save(broken, pnginfo=info)
    with pytest.raises(MetadataError, match=r"broken\.png: the krea2_lite metadata is not valid JSON"):
        read_png_metadata(broken)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(MetadataError, match=r"notes\.png: cannot read it as a PNG"):
        read_png_metadata(text)
    jpeg = tmp_path / "photo.jpg"
    image().save(jpeg, format="JPEG")
    with pytest.raises(MetadataError, match=r"photo\.jpg: not a PNG"):
        read_png_metadata(jpeg)


def test_quant_label_parses_back():
    for name in ("int8", "fp8", "int8-w8a8", "int8-w8a8-rot", "fp8-w8a8", "fp8-w8a8-rot"):
        assert quant_label(QuantSpec.parse(name)) == name
    for name in ("int4", "int4-lr16"):  # int4 records its rounding: a dict
        label = quant_label(QuantSpec.parse(name))
        assert label["rounding"] == "mse-clip" and QuantSpec.from_dict(label) == QuantSpec.parse(name)
    custom = QuantSpec("int4", group_size=64, exclude=("blocks.0.*",))
    assert QuantSpec.from_dict(quant_label(custom)) == custom
    assert quant_label(None) is None


@pytest.fixture(scope="module")
def demo(single_thread):
    from krea2_lite import Krea2Pipeline

    return Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False)


def test_pipeline_output_carries_metadata_per_image(demo, tmp_path):
    out = demo(["a red circle", "a blue square"], steps=2, num_images=2, seed=5, progress=False)
    assert len(out.metadata) == len(out.images) == 4
    assert [m["prompt"] for m in out.metadata] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [m["seed"] for m in out.metadata] == [5, 6, 7, 8]  # image i was drawn from seed + i
    first = out.metadata[0]
    assert list(first) == list(FIELDS)
    assert (first["steps"], first["guidance"], first["width"], first["height"]) == (2, demo.defaults.guidance, 64, 64)
    assert (first["model"], first["variant"], first["quant"], first["loras"], first["dtype"]) == \
        ("demo", "raw", None, [], "fp32")
    assert first["mu"] is None  # derived from the size, not pinned
    assert first["negative_prompt"] == ""  # CFG on: the empty negative prompt was used
    save_png(out.images[1], tmp_path / "x.png", out.metadata[1])
    assert read_png_metadata(tmp_path / "x.png")["seed"] == 6
    # one image regenerated alone from its own metadata: the same pixels as inside the batch of 2
    again = demo("a red circle", steps=2, seed=6, progress=False)
    assert np.abs(np.asarray(again.images[0], np.int16) - np.asarray(out.images[1], np.int16)).max() <= 1
    own = demo("a red circle", steps=2, latents=torch.zeros(1, demo.transformer.config.channels, 8, 8), progress=False)
    assert own.metadata[0]["seed"] is None  # the caller's noise: no seed describes it
