"""The shipped demo model: dataset, classifier, and generation that follows held-out prompts."""

import json
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from krea2_lite.demo import classifier, dataset, demo_path
from krea2_lite.pipeline import VARIANTS, Krea2Pipeline


def test_captions_name_the_drawn_attributes():
    images, captions, scenes = dataset.sample(64, seed=5, position_dropout=0.5)
    assert images.shape == (64, 64, 64, 3) and images.dtype == np.uint8
    for caption, scene in zip(captions, scenes):
        words = caption.split()
        assert words[:4] == ["a", scene.size, scene.colour, scene.shape]
        assert caption.endswith(f"{scene.background}{' gradient' if scene.gradient else ''} background")
        assert (scene.position in caption) or (" at the " not in caption and " in the " not in caption)
    assert any(" at the " in c or " in the " in c for c in captions)
    assert any(" at the " not in c and " in the " not in c for c in captions)
    again, captions2, _ = dataset.sample(64, seed=5, position_dropout=0.5)
    assert np.array_equal(images, again) and captions == captions2  # deterministic in the seed


def test_held_out_scenes_are_never_drawn_for_training():
    assert not set(dataset.HELD_OUT) & set(dataset.TRAIN_SCENES)
    held = set(dataset.HELD_OUT)
    _, _, scenes = dataset.sample(500, seed=1)
    assert not held & set(scenes)
    assert set(dataset.held_out_prompts(8)) <= held


def test_classifier_reads_the_ground_truth():
    images, _, scenes = dataset.sample(80, seed=11)
    for image, scene in zip(images, scenes):
        reading = classifier.classify(image)
        assert reading.agrees(scene, ("colour", "position", "size", "shape", "background")), (scene, reading)
    blank = np.full((64, 64, 3), 90, dtype=np.uint8)
    assert classifier.classify(blank).colour is None


@pytest.fixture(scope="module")
def demo(single_thread):
    return Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False)


def test_from_pretrained_demo_uses_the_folder_defaults(demo):
    assert demo.default_size == (dataset.IMAGE_SIZE, dataset.IMAGE_SIZE)
    index = json.loads((demo_path() / "model_index.json").read_text())
    assert (demo.defaults.steps, demo.defaults.guidance) == (index["krea2_lite"]["steps"],
                                                            index["krea2_lite"]["guidance"])


def test_demo_follows_held_out_prompts(demo):
    """Eight held-out prompts (attribute tuples never drawn in training), one batch, on the CPU in
    under 60 s: the classifier must read the prompt's shape colour, its position and the background
    colour back from at least 5 of 8 (measured here: 6 of 8; over 64 held-out images the colour +
    position agreement is in benchmarks/RESULTS.md)."""
    scenes = dataset.held_out_prompts(8, seed=7)
    start = time.perf_counter()
    result = demo([s.caption() for s in scenes], seed=0, progress=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"{elapsed:.1f} s"
    assert result.images[0].size == (dataset.IMAGE_SIZE, dataset.IMAGE_SIZE)
    readings = [classifier.classify(im) for im in result.images]
    agree = [r.agrees(s, ("colour", "position", "background")) for r, s in zip(readings, scenes)]
    assert sum(agree) >= 5, list(zip([s.caption() for s in scenes], readings))


def test_cli_model_demo_writes_a_native_size_image(tmp_path, single_thread):
    from krea2_lite.cli.subcommands import main

    out = tmp_path / "demo.png"
    assert main(["generate", "a small red circle on a blue background", "--model", "demo", "--dtype", "fp32",
                 "--output", str(out), "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (dataset.IMAGE_SIZE, dataset.IMAGE_SIZE)
    assert classifier.classify(image).background == "blue"


def test_folders_without_own_defaults_keep_1024_and_the_variant(tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(demo_path(), folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["krea2_lite"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = Krea2Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, progress=False)
    assert pipe.default_size == (1024, 1024) and pipe.defaults == VARIANTS["raw"]
    turbo = Krea2Pipeline.from_pretrained(demo_path(), variant="turbo", device="cpu", progress=False)
    assert turbo.defaults == VARIANTS["turbo"]  # an explicit variant wins over the folder's defaults
