"""The hub end to end: images from the fake hub equal those from the local folder, the commit that
was loaded is pinned in the PNG and `--from-png` loads it again, and component files named as
`owner/name/path/in/repo.safetensors` fetch only themselves."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from krea2_lite.cli import generate as generate_cli, generate_settings
from krea2_lite.cli.subcommands import build_parser
from official_layout import REPO
from krea2_lite import save_png
from krea2_lite.demo import demo_path
from krea2_lite.lora.formats import locate_lora_file
from krea2_lite.pipeline import Krea2Pipeline


def _pixels(pipe) -> np.ndarray:
    return np.asarray(pipe("a red circle", steps=2, seed=3, max_sequence_length=16, progress=False).images[0])


def test_images_from_the_hub_equal_those_from_the_local_folder(fake_hub):
    local = Krea2Pipeline.from_pretrained(demo_path(), device="cpu", dtype=torch.float32, progress=False)
    hub = Krea2Pipeline.from_pretrained(REPO, device="cpu", dtype=torch.float32, progress=False)
    assert hub.revision == fake_hub.commit and local.revision is None
    assert np.array_equal(_pixels(local), _pixels(hub))


def test_the_commit_loaded_is_pinned_and_from_png_loads_it_again(fake_hub, official_repo, tmp_path, capsys):
    from PIL import Image

    from krea2_lite.metadata import image_metadata

    old = fake_hub.commit
    newer = tmp_path / "newer"
    shutil.copytree(official_repo, newer)
    index = json.loads((newer / "model_index.json").read_text())
    index["krea2_lite"]["description"] = "a later commit"  # other bytes, another commit
    (newer / "model_index.json").write_text(json.dumps(index))
    head = fake_hub.add(REPO, newer)  # now main
    pinned = Krea2Pipeline.from_pretrained(REPO, revision=old, device="cpu", dtype=torch.float32, progress=False)
    assert pinned.revision == old
    meta = image_metadata(pinned, prompts=["a red circle"], negatives=None, num_images=1, seed=3, steps=2,
                          guidance=4.0, mu=None, width=64, height=64)[0]
    assert meta["model"] == REPO and meta["revision"] == old
    png = save_png(Image.new("RGB", (64, 64)), tmp_path / "old.png", meta)
    fake_hub.clear()
    args = build_parser().parse_args(["generate", "--from-png", str(png), "--quiet"])
    _, load = generate_settings.resolve_settings(args)
    again = generate_cli.load_pipeline(args, load)
    assert load["revision"] == old and again.revision == old
    assert fake_hub.requests == []  # a commit hash, all cached: not even a revision look-up
    for flags, expected in ((["--model", REPO], head), (["--revision", head], head)):
        args = build_parser().parse_args(["generate", "--from-png", str(png), *flags])
        assert generate_settings.resolve_settings(args)[1].get("revision", head) == expected
    assert Krea2Pipeline.from_pretrained(REPO, device="cpu", progress=False).revision == head
    assert capsys.readouterr().err == ""  # progress off: no announcement, no progress bars


def test_one_named_file_fetches_only_itself(fake_hub, tmp_path):
    from safetensors.torch import save_file

    repo = tmp_path / "loras"
    (repo / "styles").mkdir(parents=True)
    save_file({"x": torch.zeros(2)}, str(repo / "styles" / "one.safetensors"))
    save_file({"x": torch.ones(2)}, str(repo / "styles" / "two.safetensors"))
    (repo / "images").mkdir()
    (repo / "images" / "x.png").write_bytes(b"png")
    fake_hub.add("someone/loras", repo)
    path = locate_lora_file("someone/loras/styles/two.safetensors")
    assert path.name == "two.safetensors" and path.is_file()
    assert fake_hub.downloads() == ["styles/two.safetensors"]


def test_text_encoder_and_vae_from_the_hub_beside_a_local_transformer(fake_hub):
    from krea2_lite.loading import resolve_pipeline

    spec = resolve_pipeline(demo_path() / "transformer", text_encoder=REPO,
                            vae=f"{REPO}/vae/diffusion_pytorch_model.safetensors", progress=False)
    fetched = set(fake_hub.downloads())
    assert {"text_encoder/model-00001-of-00002.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= fetched
    assert not any(f.startswith("transformer/") and f.endswith(".safetensors") for f in fetched)
    assert spec.vae.name == "vae" and (spec.vae / "config.json").is_file()
