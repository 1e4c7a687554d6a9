"""`generate --ray` carries every per-job setting the single-process run has: images in (--image,
--mask, strength, per prompt-file line) and the step cache reach the workers, so a batch job writes
the single-process run's bytes; a changed input image makes its images a new request."""

import json

from PIL import Image

from krea2_lite import read_png_metadata
from krea2_lite.batch.jobs import plan_images
from krea2_lite.cli.subcommands import main

FAST = ["--model", "demo", "--steps", "3", "--device", "cpu", "--quiet", "--cache", "fbcache:10"]


def _inputs(folder):
    picture = Image.new("RGB", (64, 64), (0, 0, 255))
    picture.paste((255, 255, 0), (16, 16, 48, 48))
    picture.save(folder / "circle.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    mask.save(folder / "mask.png")


def _prompt_file(folder):
    lines = [{"prompt": "a blue circle", "image": "circle.png", "strength": 0.6},
             {"prompt": "a green square", "image": "circle.png", "mask": "mask.png"},
             {"prompt": "a red circle"}]
    path = folder / "edits.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_images_in_and_the_cache_reach_the_ray_workers(local_ray, tmp_path, capsys):
    _inputs(tmp_path)
    prompts = _prompt_file(tmp_path)
    single, batch = tmp_path / "single", tmp_path / "batch"
    assert main(["generate", "--prompts", str(prompts), "--output", f"{single}/", *FAST]) == 0
    assert main(["generate", "--prompts", str(prompts), "--output", str(batch), "--ray", *FAST]) == 0
    capsys.readouterr()
    made = {p.name: p.read_bytes() for p in sorted(batch.glob("*.png"))}
    assert made == {p.name: p.read_bytes() for p in sorted(single.glob("*.png"))} and len(made) == 3
    settings = [read_png_metadata(p) for p in sorted(batch.glob("*.png"))]
    assert all(s["cache"].startswith("fbcache:10") for s in settings)  # the flag reached the workers
    assert settings[0]["strength"] == 0.6 and settings[1]["mask"]["sha256"]
    inpainted = Image.open(sorted(batch.glob("*.png"))[1]).convert("RGB")
    original = Image.open(tmp_path / "circle.png").convert("RGB")
    assert inpainted.crop((0, 0, 32, 64)).tobytes() == original.crop((0, 0, 32, 64)).tobytes()  # kept half: exact


def test_a_changed_input_image_is_a_new_request(tmp_path):
    _inputs(tmp_path)
    job = dict(prompt="a blue circle", negative_prompt=None, seed=0, num_images=1, image=str(tmp_path / "circle.png"),
               strength=0.6)
    load = dict(model="demo", dtype="fp32")
    before = plan_images([job], load, "x", True)[0]["images"][0]["request"]
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "circle.png")
    after = plan_images([job], load, "x", True)[0]["images"][0]["request"]
    assert before["input_image"]["path"] == after["input_image"]["path"]
    assert before["input_image"]["sha256"] != after["input_image"]["sha256"] and before != after
