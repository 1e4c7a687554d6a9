"""Krea2Pipeline and the CLI against diffusers' Krea2Pipeline saved with save_pretrained."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from krea2_lite.pipeline import Krea2Pipeline
from krea2_lite.sampling import pack_latents
from factories import PIPELINE_CONFIG, tiny_diffusers_pipeline

WIDTH, HEIGHT = 64, 48  # latent 8×6, 4×3 image tokens


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    reference = tiny_diffusers_pipeline()
    root = tmp_path_factory.mktemp("krea2_pipe") / "pipe"
    reference.save_pretrained(root)
    return reference, root


@pytest.fixture(scope="module")
def ours(saved):
    return Krea2Pipeline.from_pretrained(saved[1], device="cpu", dtype=torch.float32, progress=False)


def reference_pixels(reference, prompt, latents, **kwargs):
    with torch.no_grad():
        out = reference(prompt, height=HEIGHT, width=WIDTH, latents=pack_latents(latents), output_type="np",
                        **kwargs).images
    return (out * 255).round().astype(np.int16)


def our_pixels(result):
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


@pytest.mark.parametrize("guidance", [0.0, 3.5])
def test_same_image_as_diffusers(saved, ours, guidance):
    reference, _ = saved
    prompts = ["a red fox sitting in the snow", "a cat"]
    latents = ours.noise(2, HEIGHT, WIDTH, seed=7)
    expected = reference_pixels(reference, prompts, latents, num_inference_steps=4, guidance_scale=guidance,
                                max_sequence_length=64)
    got = ours(prompts, width=WIDTH, height=HEIGHT, steps=4, guidance=guidance, latents=latents,
               max_sequence_length=64, progress=False)
    assert got.images[0].size == (WIDTH, HEIGHT)
    diff = np.abs(our_pixels(got) - expected)
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert expected.std() > 5  # a real picture, not a constant the test would trivially match


def test_default_sequence_length_and_negative_prompt(saved, ours):
    reference, _ = saved
    latents = ours.noise(1, HEIGHT, WIDTH, seed=3)
    kwargs = dict(negative_prompt="blurry")
    expected = reference_pixels(reference, "a large mountain", latents, num_inference_steps=3, guidance_scale=2.0,
                                **kwargs)
    got = ours("a large mountain", width=WIDTH, height=HEIGHT, steps=3, guidance=2.0, latents=latents,
               progress=False, **kwargs)
    assert np.abs(our_pixels(got) - expected).max() <= 1


def test_variant_defaults_follow_is_distilled(saved, tmp_path):
    _, root = saved
    assert Krea2Pipeline.from_pretrained(root, device="cpu", progress=False).variant == "raw"
    turbo = tmp_path / "turbo"
    shutil.copytree(root, turbo)
    index = json.loads((turbo / "model_index.json").read_text())
    index["is_distilled"] = True
    (turbo / "model_index.json").write_text(json.dumps(index))
    pipe = Krea2Pipeline.from_pretrained(turbo, device="cpu", progress=False)
    assert (pipe.variant, pipe.defaults.steps, pipe.defaults.guidance, pipe.defaults.mu) == ("turbo", 8, 0.0, 1.15)
    assert Krea2Pipeline.from_pretrained(turbo, variant="raw", device="cpu", progress=False).variant == "raw"


def test_explicit_component_paths(saved, tmp_path):
    """Official single-file transformer + text encoder folder + vae folder."""
    from safetensors.torch import save_file
    from factories import official_state_dict

    reference, root = saved
    single = tmp_path / "krea2.safetensors"
    save_file(official_state_dict(reference.transformer), single)
    pipe = Krea2Pipeline.from_pretrained(single, text_encoder=root / "text_encoder", vae=root / "vae",
                                         variant="turbo", device="cpu", dtype=torch.float32, progress=False)
    latents = pipe.noise(1, HEIGHT, WIDTH, seed=1)
    a = pipe("a cat", width=WIDTH, height=HEIGHT, steps=2, latents=latents, progress=False)
    b = Krea2Pipeline.from_pretrained(root, variant="turbo", device="cpu", dtype=torch.float32, progress=False)(
        "a cat", width=WIDTH, height=HEIGHT, steps=2, latents=latents, progress=False)
    assert torch.equal(a.latents, b.latents)


def test_seed_is_deterministic_and_per_image(ours):
    kwargs = dict(width=32, height=32, steps=2, guidance=0.0, progress=False)
    a = ours("a cat", seed=5, num_images=2, **kwargs)
    b = ours("a cat", seed=5, num_images=2, **kwargs)
    c = ours("a cat", seed=6, **kwargs)
    assert torch.equal(a.latents, b.latents)  # same seed, same device: bit-identical
    assert torch.equal(ours.noise(2, 32, 32, seed=5)[1], ours.noise(1, 32, 32, seed=6)[0])  # image i: seed + i
    assert torch.allclose(a.latents[1], c.latents[0], atol=1e-5)  # batching changes only rounding
    assert not torch.equal(a.latents[0], a.latents[1])


def test_sizes_round_up_to_16_with_a_warning(ours):
    with pytest.warns(UserWarning, match="width=40 is not a multiple of 16; using 48"):
        out = ours("", width=40, height=32, steps=1, guidance=0.0, progress=False)
    assert out.images[0].size == (48, 32)  # the empty prompt is allowed


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(width=0), ValueError, "width must be in 1..4096"),
    (dict(height=-16), ValueError, "height must be in"),
    (dict(width="512"), TypeError, "width must be an int"),
    (dict(width=8192), ValueError, "4096"),
    (dict(steps=0), ValueError, r"steps must be in 1\.\.1000"),
    (dict(guidance=-1.0), ValueError, r"guidance must be a finite number in \[0\.0, 100\.0\]"),
    (dict(num_images=0), ValueError, r"num_images must be in 1\.\.64"),
    (dict(negative_prompt=["a", "b", "c"], guidance=1.0), ValueError, "negative_prompt has 3 entries"),
    (dict(latents=torch.zeros(1, 16, 3, 3)), ValueError, r"latents must have shape \(1, 16, 4, 4\)"),
    (dict(latents=torch.full((1, 16, 4, 4), float("nan"))), ValueError, "NaN"),
])
def test_bad_arguments_are_named(ours, kwargs, error, match):
    args = dict(width=32, height=32, steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ours("a cat", **args)


def test_prompt_must_be_text(ours):
    with pytest.raises(TypeError, match="prompt must be a string"):
        ours(["a", 3], width=32, height=32, steps=1)


def test_cli_writes_png(saved, tmp_path):
    _, root = saved
    out = tmp_path / "images" / "fox.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "krea2_lite", "generate", "a red fox", "--model", str(root),
                           "--width", "32", "--height", "48", "--steps", "2", "--num-images", "2",
                           "--dtype", "fp32", "--device", "cpu", "--output", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    assert paths == [str(tmp_path / "images" / "fox_0.png"), str(tmp_path / "images" / "fox_1.png")]
    for p in paths:
        assert Image.open(p).size == (32, 48)
    assert not [p for p in out.parent.iterdir() if p.suffix == ".tmp"]


def test_cli_reports_errors_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "krea2_lite", "generate", "x", "--model", str(tmp_path / "none")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no such file or folder" in proc.stderr


@pytest.mark.parametrize("kwargs, match", [(dict(offload="disk"), "offload must be one of"),
                                           (dict(vram_gb=0), "vram_gb"),
                                           (dict(variant="fast"), "variant must be one of")])
def test_unavailable_or_bad_options_are_named(saved, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Krea2Pipeline.from_pretrained(saved[1], device="cpu", **kwargs)
