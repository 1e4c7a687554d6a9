"""Fetch by need from a fake hub in the official repo layout, with the real huggingface_hub client:
which files are requested, what is announced, and a second run that downloads nothing."""

from __future__ import annotations

import pytest

from krea2_lite.demo import demo_path
from krea2_lite.files.hub_fetch import human
from krea2_lite.loading import resolve_pipeline
from official_layout import REPO, ROOT_FILE, VISION_SHARD

SMALL = {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
         "text_encoder/model.safetensors.index.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
         "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json"}
TRANSFORMER = {"transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
               "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"}
TEXT = {"text_encoder/model-00001-of-00002.safetensors"}
VAE = {"vae/diffusion_pytorch_model.safetensors"}


def test_the_diffusers_layout_fetches_exactly_its_components(fake_hub, capsys):
    spec = resolve_pipeline(REPO, progress=False)
    fetched = fake_hub.downloads()
    assert sorted(fetched) == sorted(SMALL | TRANSFORMER | TEXT | VAE)  # each once; never the root single
    assert ROOT_FILE not in fetched and VISION_SHARD not in fetched     # file, the vision shard, images/,
    assert spec.revision == fake_hub.commit                            # the license, the pickle decoy
    assert spec.transformer.name == "transformer" and spec.config.layers > 0
    assert capsys.readouterr().err == ""  # progress=False: silent


def test_a_second_run_downloads_nothing(fake_hub):
    resolve_pipeline(REPO, progress=False)
    fake_hub.clear()
    resolve_pipeline(REPO, progress=False)
    assert fake_hub.downloads() == []
    assert {r.method for r in fake_hub.requests} == {"GET"}  # only the revision look-up (main → commit)
    assert all(r.path.startswith(f"/api/models/{REPO}/revision/") for r in fake_hub.requests)


def test_the_root_single_file_instead_of_the_diffusers_transformer(fake_hub):
    spec = resolve_pipeline(REPO, transformer=f"{REPO}/{ROOT_FILE}", progress=False)
    fetched = set(fake_hub.downloads())
    assert ROOT_FILE in fetched and not fetched & TRANSFORMER
    assert spec.transformer.name == ROOT_FILE and (TEXT | VAE) <= fetched


def test_the_root_single_file_as_the_model(fake_hub):
    spec = resolve_pipeline(f"{REPO}/{ROOT_FILE}", text_encoder=REPO, vae=REPO, progress=False)
    fetched = set(fake_hub.downloads())
    assert {ROOT_FILE} | TEXT | VAE <= fetched and not fetched & TRANSFORMER
    assert spec.transformer.name == ROOT_FILE and spec.revision == fake_hub.commit


def test_a_local_transformer_means_no_transformer_download(fake_hub):
    spec = resolve_pipeline(REPO, transformer=demo_path() / "transformer", progress=False)
    fetched = set(fake_hub.downloads())
    assert not any(f.startswith("transformer/") and f.endswith(".safetensors") for f in fetched)
    assert ROOT_FILE not in fetched and (TEXT | VAE) <= fetched
    assert spec.transformer == demo_path() / "transformer"


def test_what_will_be_fetched_is_said_first(fake_hub, capsys):
    resolve_pipeline(REPO)
    err = capsys.readouterr().err
    head = err.split("krea2_lite: to fetch")[0]
    for name in sorted(TRANSFORMER | TEXT | VAE):
        size = (fake_hub.repos[REPO].commits[fake_hub.commit] / name).stat().st_size
        assert f"{name}  {human(size)}  to fetch" in head, err
    assert "to fetch 4 file(s)" in err and "free disk at" in err
    resolve_pipeline(REPO)
    assert "to fetch 0 file(s), 0 B; already cached 4 file(s)" in capsys.readouterr().err


def test_the_default_text_encoder_and_vae_fetch_only_what_is_read(fake_hub, official_repo, tmp_path):
    """A transformer alone: the text encoder from Qwen/Qwen3-VL-4B-Instruct (its root; the vision
    shard skipped) and the VAE from Qwen/Qwen-Image (vae/ only, never its other components)."""
    import shutil

    from krea2_lite.loading.pipeline import DEFAULT_TEXT_ENCODER, DEFAULT_VAE

    qwen_vl, qwen_image = tmp_path / "qwen_vl", tmp_path / "qwen_image"
    shutil.copytree(official_repo / "text_encoder", qwen_vl)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(official_repo / "tokenizer" / name, qwen_vl)
    shutil.copytree(official_repo, qwen_image, ignore=shutil.ignore_patterns("turbo.safetensors", "text_encoder"))
    fake_hub.add(DEFAULT_TEXT_ENCODER, qwen_vl)
    fake_hub.add(DEFAULT_VAE, qwen_image)
    spec = resolve_pipeline(demo_path() / "transformer", progress=False)
    weights = sorted(f for f in fake_hub.downloads() if f.endswith(".safetensors"))
    assert weights == ["model-00001-of-00002.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert spec.vae.name == "vae" and (spec.text_encoder / "config.json").is_file()
