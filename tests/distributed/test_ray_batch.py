"""`generate --prompts FILE --output DIR --ray` on a local Ray with the demo model: the single-process
run's images (same bytes: pixels and metadata), once each, resumable, damage repaired."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from krea2_lite import read_png_metadata
from krea2_lite.cli.subcommands import main
from krea2_lite.batch import generate
from krea2_lite.batch.manifest import MANIFEST, read_manifest
from krea2_lite.batch.storage import Storage, sha256

FAST = ["--model", "demo", "--steps", "2", "--device", "cpu", "--quiet"]
LINES = [
    {"prompt": "a red circle"}, {"prompt": "a blue square", "seed": 11}, {"prompt": "a green triangle", "cfg": 0},
    {"prompt": "a yellow circle on the left", "num_images": 2}, {"prompt": "a purple square", "seed": 5},
    {"prompt": "a small red triangle"}, {"prompt": "a big blue circle", "negative_prompt": "green"},
    {"prompt": "an orange square", "steps": 3}, {"prompt": "a red square at the top"}, {"prompt": "a blue triangle"},
    {"prompt": "a green circle", "seed": 99}, {"prompt": "a yellow square", "size": "48x64"},
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "shapes.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(prompts, tmp_path_factory):
    """What the single-process `generate --prompts` writes: {file name: bytes}."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["generate", "--prompts", str(prompts), "--output", f"{out}/", *FAST]) == 0
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def images(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_two_workers_write_the_single_process_images_once_and_a_rerun_makes_none(local_ray, prompts, reference,
                                                                                  tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), "--output", str(out), "--ray", "--workers", "2", *FAST]) == 0
    assert "13 generated, 0 already done, 13 in all" in capsys.readouterr().out
    assert len(reference) == 13 and images(out) == reference  # bytes: pixels and both metadata chunks
    entries = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(13))
    for entry in entries:
        data = (out / entry["file"]).read_bytes()
        assert entry["sha256"] == sha256(data) and entry["settings"] == read_png_metadata(out / entry["file"])
        assert entry["seconds"] > 0 and entry["worker"]
    assert entries[4]["seed"] == 1 and entries[4]["line"] == 4  # line 4's second image: seed 0 + 1
    assert len({e["worker"] for e in entries}) == 2  # both workers made images

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    summary = generate(prompts, out, model="demo", steps=2, workers=2, progress=False)
    assert summary == dict(total=13, skipped=13, generated=0, manifest=str(out / MANIFEST))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten


@pytest.mark.slow
def test_a_damaged_png_and_a_torn_manifest_line_are_repaired(local_ray, prompts, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference.items():  # a finished run, as the single-process files plus a manifest
        (out / name).write_bytes(data)
    generate(prompts, out, model="demo", steps=2, workers=1, progress=False)  # adopts nothing: no manifest yet
    damaged = sorted(out.glob("*.png"))[6]
    damaged.write_bytes(damaged.read_bytes()[:200])
    with open(out / MANIFEST, "a") as fh:
        fh.write('{"index": 3, "fi')  # a torn last line
    summary = generate(prompts, out, model="demo", steps=2, workers=1, progress=False)
    assert (summary["generated"], summary["skipped"]) == (1, 12)
    assert images(out) == reference
    assert sorted(read_manifest(Storage(out))) == list(range(13))


@pytest.mark.slow
def test_a_worker_killed_mid_job_still_gives_every_image_once(local_ray, prompts, reference, tmp_path):
    out = tmp_path / "out"
    result = {}
    job = threading.Thread(target=lambda: result.update(
        generate(prompts, out, model="demo", steps=2, workers=2, progress=False)))
    job.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / MANIFEST).exists() or not read_manifest(Storage(out)):
        time.sleep(0.2)
    first = next(iter(read_manifest(Storage(out)).values()))
    os.kill(int(first["worker"].rsplit(":", 1)[1]), signal.SIGKILL)  # a live worker, between or inside jobs
    job.join(timeout=300)
    assert result["generated"] == 13 and images(out) == reference
    lines = (out / MANIFEST).read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == list(range(13))
