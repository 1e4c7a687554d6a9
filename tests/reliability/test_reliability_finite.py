"""Reliability battery, finite checks end to end: NaN/inf from the VAE's config or weights, from
the schedule that mu / the scheduler settings give, or from the decoder is refused with its cause
named (NonFiniteError, a FloatingPointError) — never a silent black image."""

import json
import math

import pytest
import torch

from krea2_lite.errors import CorruptCheckpointError, NonFiniteError
from krea2_lite.pipeline import Krea2Pipeline
from reliability_fixtures import copy_of, pipeline_folder, snapshot

CALL = dict(width=32, height=32, steps=2, guidance=0.0, progress=False, max_sequence_length=16)  # short: fast


@pytest.fixture(scope="module")
def pipe():
    return Krea2Pipeline.from_pretrained(pipeline_folder(), device="cpu", dtype=torch.float32, progress=False)


@pytest.mark.parametrize("field, value", [("latents_std", math.inf), ("latents_mean", math.nan)])
def test_non_finite_vae_statistics_are_refused_at_load(tmp_path, field, value):
    folder = copy_of(pipeline_folder(), tmp_path / "pipe")
    path = folder / "vae" / "config.json"
    config = json.loads(path.read_text())
    config[field] = [value] + config[field][1:]
    path.write_text(json.dumps(config))
    before = snapshot(folder)
    with pytest.raises(CorruptCheckpointError, match=rf"vae/config\.json: .*{field} must hold finite numbers"):
        Krea2Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, progress=False)
    assert snapshot(folder) == before


def test_non_finite_vae_weight_is_named(pipe):
    name, param = next((n, p) for n, p in pipe.vae.named_parameters() if n.endswith("weight") and "decoder" in n)
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        with pytest.raises(NonFiniteError, match=rf"the VAE weight '{name}' holds NaN/inf"):
            pipe("a cat", **CALL)
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert pipe("a cat", **CALL).images[0].size == (32, 32)  # and the pipeline still works


def test_decoder_overflow_from_finite_latents(pipe, monkeypatch):
    monkeypatch.setattr(pipe.vae, "decode", lambda latents, **kw: torch.full((1, 3, 32, 32), float("inf")))
    with pytest.raises(FloatingPointError, match="the VAE decoded NaN/inf from finite latents"):
        pipe("a cat", **CALL)


def test_schedule_from_degenerate_scheduler_settings_blames_the_scheduler(pipe, monkeypatch):
    # Each value is in range, but together they extrapolate mu to ≈ −4400 for a 32² image: exp(mu) = 0.
    monkeypatch.setattr(pipe, "shift", dict(base_image_seq_len=256, max_image_seq_len=257, base_shift=0.5,
                                            max_shift=19.0))
    with pytest.raises(NonFiniteError, match=r"sampling schedule for mu=-4\d{3} .*scheduler's shift settings"):
        pipe("a cat", **CALL)


def test_nan_from_the_transformer_still_names_the_step(pipe, monkeypatch):
    real = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(FloatingPointError, match="latents became NaN/inf at step 1 of 2"):
        pipe("a cat", **CALL)
