"""Training on the shipped demo model: the run writes a diffusers-loadable LoRA, resume equals an
uninterrupted run, the cache is reused, and the LoRA gives the same output in diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from krea2_lite.demo import dataset, demo_path
from krea2_lite.train import train_lora

OPTIONS = dict(rank=2, lr=2e-3, resolution=64, targets="attn", seed=5, progress=False, log=lambda *a: None)


def write_scene_folder(folder, count, caption="a zorblat", seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scene = dataset.Scene("orange", "star", "large", "at the bottom right", "white")
    for i in range(count):
        Image.fromarray(dataset.render(scene, rng)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_scene_folder(root / "data", 4)
    cache = root / "cache"
    full = train_lora(str(demo_path()), data=data, output=root / "full" / "lora.safetensors", steps=4,
                      cache_dir=cache, batch=2, flip=True, **OPTIONS)
    part = root / "part" / "lora.safetensors"
    train_lora(str(demo_path()), data=data, output=part, steps=2, save_every=1, cache_dir=cache, batch=2, flip=True,
               **OPTIONS)
    resumed = train_lora(str(demo_path()), data=data, output=part, steps=4, cache_dir=cache, batch=2, flip=True,
                         resume=str(part) + ".checkpoint", **OPTIONS)
    return dict(root=root, full=full, resumed=resumed, cache=cache)


def test_resume_gives_the_same_lora_as_an_uninterrupted_run(runs):
    full, resumed = load_file(runs["full"]), load_file(runs["resumed"])
    assert full.keys() == resumed.keys() and len(full) == 4 * 5 * 2
    assert any(v.abs().sum() > 0 for k, v in full.items() if "lora_B" in k)  # it trained
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    losses = [json.loads(line) for line in runs["resumed"].with_name("lora.loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert runs["full"].with_name("lora.loss.png").read_bytes()[:4] == b"\x89PNG"


def test_file_layout_and_adapter_metadata(runs):
    from safetensors import safe_open

    with safe_open(str(runs["full"]), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert meta["transformer.r"] == 2 and meta["transformer.lora_alpha"] == 2.0
    assert "transformer_blocks.0.attn.to_q" in meta["transformer.target_modules"]
    assert "transformer.transformer_blocks.3.attn.to_out.0.lora_A.weight" in keys


def test_the_lora_gives_the_same_output_in_diffusers(runs):
    pytest.importorskip("peft")
    from diffusers import Krea2Transformer2DModel
    from diffusers.loaders.lora_pipeline import Krea2LoraLoaderMixin

    from krea2_lite.loading import load_transformer
    from krea2_lite.lora import load_lora
    from krea2_lite.sampling import positions

    reference = Krea2Transformer2DModel.from_pretrained(demo_path() / "transformer", torch_dtype=torch.float32)
    state, metadata = Krea2LoraLoaderMixin.lora_state_dict(str(runs["full"]), return_lora_metadata=True)
    Krea2LoraLoaderMixin.load_lora_into_transformer(state, transformer=reference, metadata=metadata)
    ours = load_transformer(demo_path(), dtype=torch.float32, progress=False)
    load_lora(ours, runs["full"])
    cfg = ours.config
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 16, cfg.in_channels, generator=g)
    ctx = torch.randn(1, 5, cfg.txtlayers, cfg.txtdim, generator=g)
    t, pos = torch.tensor([0.7]), positions(5, 4, 4)
    with torch.no_grad():
        want = reference(img, ctx, t, pos, return_dict=False)[0]
        got = ours(img, ctx, t, pos)
        base = Krea2Transformer2DModel.from_pretrained(demo_path() / "transformer")(img, ctx, t, pos,
                                                                                    return_dict=False)[0]
    assert (want - base).abs().max() > 1e-4  # the LoRA changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cache_is_reused_and_skips_are_listed(runs, tmp_path):
    data = write_scene_folder(tmp_path / "data", 2)
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data" / "broken.txt").write_text("x")
    (tmp_path / "data" / "nocaption.png").write_bytes((data / "img0.png").read_bytes())
    messages = []
    before = sorted(p.name for p in runs["cache"].rglob("*.safetensors"))
    train_lora(str(demo_path()), data=data, output=tmp_path / "out" / "l.safetensors", steps=1, flip=True,
               cache_dir=runs["cache"], **{**OPTIONS, "log": messages.append})
    after = sorted(p.name for p in runs["cache"].rglob("*.safetensors"))
    assert before == after  # the same two images (same bytes) and caption: every entry reused
    text = "\n".join(messages)
    assert "skipped 2 file(s)" in text
    assert "broken.png: cannot be read" in text and "nocaption.png: no caption" in text
    assert "encoding" not in text  # neither encoder was loaded


@pytest.mark.parametrize("quant", [pytest.param("int4", marks=pytest.mark.slow), "int8-w8a8"])  # int4: ~25 s of MSE rounding
def test_trains_beside_a_quantized_base(runs, quant, tmp_path):
    out = train_lora(str(demo_path()), data=runs["root"] / "data", output=tmp_path / "q.safetensors", steps=2,
                     quant=quant, cache_dir=runs["cache"], **{**OPTIONS, "lr": 1e-2})
    state = load_file(out)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
