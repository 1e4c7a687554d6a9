"""Images in: reading, converting, sizing and checking image=, mask_image=, outpaint= (no model)."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from krea2_lite import images_in, inpaint
from krea2_lite.errors import ArgumentError, ImageInputError, Krea2LiteError


def _rgb(w=32, h=16, colour=(200, 30, 40)):
    return Image.new("RGB", (w, h), colour)


def test_modes_become_rgb_and_transparency_goes_over_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red: white
    assert images_in.to_rgb_array(rgba)[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (16, 16), (0, 0, 0, 128))
    assert images_in.to_rgb_array(half)[0, 0].tolist() == [127, 127, 127]
    pal = _rgb(16, 16, (10, 200, 30)).quantize(colors=4)
    assert images_in.to_rgb_array(pal)[0, 0].tolist() == [10, 200, 30]
    grey = Image.new("L", (16, 16), 77)
    assert images_in.to_rgb_array(grey)[0, 0].tolist() == [77, 77, 77]
    sixteen = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    assert images_in.to_rgb_array(sixteen)[0, 0].tolist() == [255, 255, 255]
    sixteen.save(tmp_path / "g16.png")
    pixels, record = images_in.read_image(tmp_path / "g16.png")
    assert torch.equal(pixels, torch.ones(1, 3, 16, 16))
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    assert images_in.to_rgb_array(cmyk)[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied_and_the_file_is_hashed(tmp_path):
    img = _rgb(32, 16)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    pixels, record = images_in.read_image(path)
    assert pixels.shape == (1, 3, 32, 16)  # displayed portrait
    assert record == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_unreadable_inputs_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    for path, text in ((bad, "cannot be read"), (tmp_path / "missing.png", "no such file"), (tmp_path, "not a file")):
        with pytest.raises(ImageInputError, match=str(path).replace("\\", "\\\\")) as info:
            images_in.prepare(path)
        assert text in str(info.value)
    with pytest.raises(ImageInputError, match="mask_image"):
        images_in.prepare(_rgb(), mask_image=bad)
    assert issubclass(ImageInputError, Krea2LiteError) and issubclass(ImageInputError, ValueError)


def test_tensor_inputs_are_checked():
    good = torch.rand(2, 3, 16, 32)
    prepared, w, h = images_in.prepare(good, total=2)
    assert (w, h) == (32, 16) and torch.equal(prepared.pixels, good)  # no resize: the tensor as given
    for bad in (torch.rand(1, 4, 16, 16), torch.rand(3, 16, 16), torch.full((1, 3, 16, 16), 1.5),
                torch.full((1, 3, 16, 16), float("nan")), torch.ones(1, 3, 16, 16, dtype=torch.uint8)):
        with pytest.raises(ImageInputError):
            images_in.prepare(bad)
    with pytest.raises(ImageInputError, match="3 images"):
        images_in.prepare(torch.rand(3, 3, 16, 16), total=2)
    with pytest.raises(ImageInputError, match="PIL image, a path"):
        images_in.prepare(np.zeros((16, 16, 3)))


def test_size_defaults_round_to_16_with_a_warning_and_explicit_sizes_resize():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, w, h = images_in.prepare(_rgb(32, 16))  # already multiples of 16: silent
    assert (w, h) == (32, 16)
    with pytest.warns(UserWarning, match="resizing it to 48×48"):
        prepared, w, h = images_in.prepare(_rgb(50, 40))
    assert (w, h) == (48, 48) and prepared.pixels.shape == (1, 3, 48, 48)
    prepared, w, h = images_in.prepare(_rgb(50, 40), width=64, height=64)
    assert prepared.pixels.shape == (1, 3, 64, 64)
    assert torch.equal(prepared.pixels, (prepared.pixels * 255).round() / 255)  # on the 8-bit grid
    with pytest.raises(ImageInputError, match="limited"):
        images_in.prepare(_rgb(5000, 16))


def test_strength_and_mask_arguments():
    assert images_in.prepare(_rgb())[0].strength == images_in.DEFAULT_STRENGTH
    mask = Image.new("L", (32, 16), 255)
    assert images_in.prepare(_rgb(), mask_image=mask)[0].strength == 1.0
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ArgumentError, match="strength"):
            images_in.prepare(_rgb(), strength=bad)
    with pytest.raises(ArgumentError, match="mask_blur"):
        images_in.prepare(_rgb(), mask_image=mask, mask_blur=-1)
    for kwargs in (dict(mask_image=mask), dict(strength=0.5), dict(outpaint=(1, 0, 0, 0))):
        with pytest.raises(ImageInputError, match="need an image"):
            images_in.prepare(None, **kwargs)
    with pytest.raises(ImageInputError, match="not both"):
        images_in.prepare(_rgb(), mask_image=mask, outpaint=(16, 0, 0, 0))


def test_mask_resize_aspect_and_all_black():
    prepared, _, _ = images_in.prepare(_rgb(32, 16), mask_image=Image.new("L", (64, 32), 255))
    assert prepared.mask.shape == (1, 1, 16, 32) and prepared.mask.min() == 1
    with pytest.raises(ImageInputError, match="aspect ratio"):
        images_in.prepare(_rgb(32, 16), mask_image=Image.new("L", (32, 32), 255))
    with pytest.raises(ImageInputError, match="all black"):
        images_in.prepare(_rgb(32, 16), mask_image=Image.new("L", (32, 16), 0))
    rgba = Image.new("RGBA", (32, 16), (255, 255, 255, 0))  # a mask is read by colour, not alpha
    assert images_in.prepare(_rgb(32, 16), mask_image=rgba)[0].mask.min() == 1


def test_mask_blur_spreads_within_three_sigma():
    m = np.zeros((16, 64), dtype=np.uint8)
    m[:, 32:] = 255
    prepared, _, _ = images_in.prepare(_rgb(64, 16), mask_image=Image.fromarray(m), mask_blur=2)
    row = prepared.mask[0, 0, 0]
    assert row[31] > 0 and row[32] < 1 and row[:32 - 6].max() == 0 and row[32 + 6:].min() >= 1 - 1e-6


def test_outpaint_canvas_mask_and_rounding():
    img = _rgb(32, 16)
    prepared, w, h = images_in.prepare(img, outpaint=(16, 0, 16, 16))
    assert (w, h) == (64, 32) and prepared.outpaint == (16, 0, 16, 16)
    assert torch.equal(prepared.pixels[:, :, :16, 16:48], images_in.read_image(img)[0])
    assert prepared.mask[0, 0, :16, 16:48].max() == 0 and prepared.mask.sum() == 64 * 32 - 32 * 16
    with pytest.warns(UserWarning, match="grows to 48×32"):
        prepared, w, h = images_in.prepare(img, outpaint=(5, 3, 0, 0))
    assert (w, h) == (48, 32) and prepared.outpaint == (5, 3, 11, 13)
    for bad in ((0, 0, 0, 0), (1, 2, 3), (-1, 0, 0, 0), (1.5, 0, 0, 0), "16,0,0,0"):
        with pytest.raises((ImageInputError, ArgumentError)):
            images_in.prepare(img, outpaint=bad)
    with pytest.raises(ImageInputError, match="width / height"):
        images_in.prepare(img, outpaint=(16, 0, 16, 0), width=32)


def test_schedule_cut_and_noising():
    schedule = torch.linspace(1, 0, 11)
    assert torch.equal(inpaint.cut_schedule(schedule, 1.0), schedule)
    assert torch.equal(inpaint.cut_schedule(schedule, 0.6), schedule[4:])
    assert len(inpaint.cut_schedule(schedule, 0.1)) == 2
    with pytest.raises(ArgumentError, match="no step"):
        inpaint.cut_schedule(schedule, 0.09)
    x0, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    assert torch.equal(inpaint.noised(x0, noise, 1.0), noise)
    assert torch.equal(inpaint.noised(x0, noise, 0.0), x0)
    assert torch.allclose(inpaint.noised(x0, noise, 0.25), 0.75 * x0 + 0.25 * noise)
