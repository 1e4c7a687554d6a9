"""resolve_pipeline: what the user gave → one PipelineSpec, the named transformer checked first."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

import krea2_lite.loading.pipeline as resolve_mod
from krea2_lite.errors import CheckpointNotFoundError, NotKrea2CheckpointError, UnsafeCheckpointFormatError
from krea2_lite.loading import PipelineSpec, resolve_pipeline


@pytest.fixture
def resolved(monkeypatch):
    """Every path resolve_pipeline resolves, in order (and nothing is downloaded)."""
    calls, real = [], resolve_mod.HubFetcher.resolve

    def spy(self, path, *args, **kwargs):
        calls.append(str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(resolve_mod.HubFetcher, "resolve", spy)
    return calls


@pytest.mark.parametrize("name, error", [("model.pt", UnsafeCheckpointFormatError),
                                         ("model.ckpt", UnsafeCheckpointFormatError),
                                         ("missing.safetensors", CheckpointNotFoundError)])
def test_the_named_model_is_checked_before_any_default(tmp_path, resolved, name, error):
    path = tmp_path / name
    if not name.startswith("missing"):
        path.write_bytes(b"not read")
    with pytest.raises(error, match=name):
        resolve_pipeline(path)
    assert not any("Qwen/" in call for call in resolved)  # the default text encoder / VAE never touched


def test_a_wrong_model_is_reported_as_itself(tmp_path, resolved):
    import torch

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "flux.safetensors")
    with pytest.raises(NotKrea2CheckpointError, match="FLUX"):
        resolve_pipeline(tmp_path / "flux.safetensors")
    assert not any("Qwen/" in call for call in resolved)


def test_a_folder_without_weights_names_the_folder(tmp_path, resolved):
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path)):
        resolve_pipeline(tmp_path)
    assert not any("Qwen/" in call for call in resolved)


def test_the_demo_folder_resolves_to_one_description():
    from krea2_lite.demo import demo_path

    spec = resolve_pipeline("demo")
    assert isinstance(spec, PipelineSpec)
    root = demo_path()
    assert (spec.transformer, spec.text_encoder, spec.vae) == (root / "transformer", root / "text_encoder", root / "vae")
    assert spec.default_size == (64, 64) and spec.defaults is not None and spec.quant is None
    assert spec.config.layers >= 1 and spec.variant in ("raw", "turbo")
    assert resolve_pipeline("demo", variant="turbo").defaults is None  # an explicit variant wins
    assert resolve_pipeline("demo", quant="int8").quant.name == "int8"
