import numpy as np
import pytest
import torch

from krea2_lite import Krea2Config, Krea2Transformer
from krea2_lite.sampling import (TextBatch, compact_text, denoise, pack_latents, positions, resolution_mu,
                                 sigmas, stack_text, unpack_latents)
from factories import diffusers_transformer, official_state_dict


def official_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=6400, base_shift=0.5, max_shift=1.15,
                                           time_shift_type="exponential")


@pytest.mark.parametrize("steps, tokens", [(8, 4096), (52, 1024), (3, 256), (20, 9216)])
def test_schedule_equals_diffusers_with_official_config(steps, tokens):
    from diffusers.pipelines.krea2.pipeline_krea2 import calculate_shift

    mu = resolution_mu(tokens)
    assert mu == pytest.approx(calculate_shift(tokens, 256, 6400, 0.5, 1.15), abs=1e-12)
    scheduler = official_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = sigmas(steps, mu)
    assert torch.equal(ours, scheduler.sigmas.float())
    assert ours[0] == 1.0 and ours[-1] == 0.0 and bool((ours[1:] < ours[:-1]).all())


def test_schedule_matches_official_formula():
    # ts = e^mu / (e^mu + (1/t − 1)) on linspace(1, 0, steps+1), mu pinned (Turbo: 1.15).
    t = torch.linspace(1, 0, 9, dtype=torch.float64)[:-1]
    expected = np.exp(1.15) / (np.exp(1.15) + (1 / t - 1))
    assert torch.allclose(sigmas(8, 1.15)[:-1].double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        sigmas(0, 1.0)


def test_resolution_mu_end_points():
    assert resolution_mu(256) == pytest.approx(0.5)
    assert resolution_mu(6400) == pytest.approx(1.15)


def test_pack_round_trip_and_diffusers_layout():
    from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline

    lat = torch.randn(2, 16, 6, 10)
    packed = pack_latents(lat)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), lat)
    holder = type("P", (), {"patch_size": 2, "vae_scale_factor": 8})()
    assert torch.equal(packed, Krea2Pipeline._pack_latents(holder, lat, 2, 16, 6, 10))
    pos = positions(3, 3, 5)
    ref = Krea2Pipeline.prepare_position_ids(3, 3, 5, "cpu")
    assert torch.equal(pos, ref)


def test_compaction_keeps_real_tokens_in_order():
    hidden = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1, 1)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    tb = compact_text(hidden, mask)
    assert tb.context.shape == (2, 5, 1, 1)
    assert tb.context[0, :3, 0, 0].tolist() == [0, 1, 5]
    assert tb.context[1, :, 0, 0].tolist() == [6, 7, 8, 10, 11]
    assert tb.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    full = compact_text(hidden, torch.ones(2, 6, dtype=torch.bool))
    assert full.mask is None and torch.equal(full.context, hidden)
    stacked = stack_text(full, tb)
    assert stacked.context.shape == (4, 6, 1, 1) and stacked.mask[:2].all() and not stacked.mask[2, 5]


def test_compacted_sampling_equals_padded_sampling():
    cfg = Krea2Config.tiny()
    model = Krea2Transformer(cfg).eval()
    model.load_state_dict(official_state_dict(diffusers_transformer(cfg, seed=2)))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 12, cfg.txtlayers, cfg.txtdim, generator=g)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :4] = True
    mask[0, 10:] = True   # prompt, padding, then the template suffix
    mask[1, :7] = True
    mask[1, 10:] = True
    uncond_mask = torch.zeros(2, 12, dtype=torch.bool)
    uncond_mask[:, 10:] = True
    uncond_mask[:, 0] = True
    noise = torch.randn(2, 6, cfg.in_channels, generator=g)
    schedule = sigmas(3, 0.8)
    with torch.no_grad():
        padded = denoise(model, noise, TextBatch(hidden, mask), schedule, guidance=2.0,
                         uncond=TextBatch(hidden.flip(0), uncond_mask), rows=2, cols=3)
        compact = denoise(model, noise, compact_text(hidden, mask), schedule, guidance=2.0,
                          uncond=compact_text(hidden.flip(0), uncond_mask), rows=2, cols=3)
    assert ((padded - compact).abs().max() / padded.abs().max()) <= 1e-5


def test_nan_latents_stop_with_the_step():
    def broken(x, ctx, t, pos, mask):
        return torch.full_like(x, float("nan")) if float(t[0]) < 0.95 else torch.zeros_like(x)

    text = TextBatch(torch.zeros(1, 2, 1, 1), None)
    with pytest.raises(FloatingPointError, match="step 2 of 4"):
        denoise(broken, torch.zeros(1, 4, 4), text, sigmas(4, 1.15), rows=2, cols=2)
