"""Images in on the shipped demo model (CPU, seconds): img2img, inpainting, outpainting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from krea2_lite.demo import classifier, dataset
from krea2_lite.errors import ArgumentError, CheckpointKeysError, ImageInputError
from krea2_lite.pipeline import Krea2Pipeline

PROMPT = "a large red circle in the center on a white background"
OTHER = "a small yellow star at the top left on a white background"


@pytest.fixture(scope="module")
def demo(single_thread):
    return Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def made(demo):
    return demo(PROMPT, seed=3, steps=8, progress=False).images[0]


def test_strength_one_equals_text_to_image(demo, made):
    out = demo(PROMPT, seed=3, steps=8, image=made, strength=1.0, progress=False)
    again = demo(PROMPT, seed=3, steps=8, progress=False)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))
    assert out.metadata[0]["strength"] == 1.0 and out.metadata[0]["image"] is None


def test_low_strength_keeps_colour_and_position(demo):
    """One step of 20 from the noised input: the classifier reads the input's colour and position,
    while text to image with the same prompt draws its own (a yellow star at the top left). The demo
    VAE's own round trip reads every shape as a circle, so shape is not asserted (see docs)."""
    images, _, scenes = dataset.sample(8, seed=7)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    kept = t2i = 0
    for k, scene in enumerate(scenes):
        out = demo(OTHER, seed=1, image=pixels[k:k + 1], strength=0.05, progress=False)
        kept += classifier.classify(np.asarray(out.images[0])).agrees(scene)
    reading = classifier.classify(np.asarray(demo(OTHER, seed=1, progress=False).images[0]))
    t2i = sum(reading.agrees(scene) for scene in scenes)
    assert kept >= 5 and t2i <= 2, (kept, t2i)  # measured: 6 of 8 kept, 0 for text to image


def test_inpainting_keeps_outside_pixels_exactly_and_changes_inside(demo, made):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    original = np.asarray(made)
    for blur in (0, 2):
        out = demo(OTHER, seed=2, steps=8, image=made, mask_image=Image.fromarray(mask), mask_blur=blur,
                   progress=False)
        got = np.asarray(out.images[0])
        keep = 32 - 3 * blur - 1 if blur else 32
        assert np.array_equal(got[:, :keep], original[:, :keep])
        assert np.abs(got[:, 40:].astype(int) - original[:, 40:]).mean() > 5
        assert out.metadata[0]["mask_blur"] == blur


def test_outpainting_returns_the_padded_canvas_with_the_original_in_place(demo, made):
    out = demo(PROMPT, seed=2, steps=8, image=made, outpaint=(16, 0, 16, 16), progress=False)
    got = np.asarray(out.images[0])
    assert got.shape == (80, 96, 3)
    assert np.array_equal(got[:64, 16:80], np.asarray(made))
    assert out.metadata[0]["outpaint"] == [16, 0, 16, 16]


def test_bad_inputs_fail_before_any_work(demo, made, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(demo, "_generate", boom)
    with pytest.raises(ArgumentError, match="no step"):
        demo(PROMPT, steps=4, image=made, strength=0.2)
    with pytest.raises(ImageInputError, match="all black"):
        demo(PROMPT, image=made, mask_image=Image.new("L", (64, 64)))
    with pytest.raises(ImageInputError, match="need an image"):
        demo(PROMPT, strength=0.5)


def test_decoder_only_vae_keeps_text_to_image_and_names_what_is_missing(tmp_path, single_thread):
    import shutil

    from krea2_lite.demo import demo_path

    shutil.copytree(demo_path(), tmp_path / "demo")
    weights = tmp_path / "demo" / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if not k.startswith(("encoder.", "quant_conv."))}, weights)
    pipe = Krea2Pipeline.from_pretrained(tmp_path / "demo", device="cpu", dtype=torch.float32, progress=False)
    image = pipe(PROMPT, steps=2, progress=False).images[0]
    with pytest.raises(CheckpointKeysError, match="no encoder weights"):
        pipe(PROMPT, steps=2, image=image)
