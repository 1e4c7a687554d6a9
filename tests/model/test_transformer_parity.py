"""krea2_lite's transformer against diffusers' Krea2Transformer2DModel (itself checked equal to
the official krea-2 mmdit.py) on random tiny configurations, fp32, relative error ≤ 1e-5."""

import pytest
import torch

from krea2_lite import Krea2Config, Krea2Transformer
from factories import diffusers_transformer, official_state_dict, random_inputs

CONFIGS = {
    "gqa1": Krea2Config.tiny(heads=2, kvheads=2),
    "gqa2": Krea2Config.tiny(),
    "gqa4": Krea2Config.tiny(features=128, heads=8, kvheads=2, txtheads=4, txtkvheads=2, layers=3),
    "gqa6-hd32": Krea2Config.tiny(features=192, heads=6, kvheads=1, txtdim=48, txtheads=3, txtkvheads=1),
}


def ours_from(reference, cfg):
    model = Krea2Transformer(cfg).eval()
    model.load_state_dict(official_state_dict(reference), strict=True)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
def test_matches_diffusers_fp32_with_padded_prompt(name, grid):
    cfg = CONFIGS[name]
    reference = diffusers_transformer(cfg)
    ours = ours_from(reference, cfg)
    rows, cols = grid
    img, context, t, pos = random_inputs(cfg, batch=2, txt_len=7, rows=rows, cols=cols)
    text_mask = torch.ones(2, 7, dtype=torch.bool)
    text_mask[1, 4:] = False  # second prompt is padded
    with torch.no_grad():
        expected = reference(img, context, t, pos, encoder_attention_mask=text_mask, return_dict=False)[0]
        full_mask = torch.cat([text_mask, torch.ones(2, rows * cols, dtype=torch.bool)], dim=1)
        got = ours(img, context, t, pos.expand(2, -1, -1), full_mask)
    assert got.shape == (2, rows * cols, cfg.in_channels)
    assert rel_err(got, expected) <= 1e-5


def test_mask_forms_and_padding_invariance():
    cfg = CONFIGS["gqa2"]
    ours = ours_from(diffusers_transformer(cfg, seed=3), cfg)
    img, context, t, pos = random_inputs(cfg, batch=1, txt_len=4, rows=2, cols=3)
    with torch.no_grad():
        unpadded = ours(img, context, t, pos)
        # Same prompt plus 3 garbage pad tokens masked out: real tokens must not notice.
        padded_ctx = torch.cat([context, torch.randn(1, 3, cfg.txtlayers, cfg.txtdim) * 50], dim=1)
        text_mask = torch.tensor([[True] * 4 + [False] * 3])
        from factories import positions
        padded = ours(img, padded_ctx, t, positions(7, 2, 3), text_mask)
        all_true = ours(img, context, t, pos, torch.ones(1, 4 + 6, dtype=torch.bool))
    assert rel_err(padded, unpadded) <= 1e-5
    assert torch.equal(all_true, unpadded)


def test_bf16_forward_close_to_fp32():
    cfg = CONFIGS["gqa4"]
    reference = diffusers_transformer(cfg, seed=5)
    ours32 = ours_from(reference, cfg)
    ours16 = ours_from(reference, cfg)
    ours16.to(torch.bfloat16)
    for name, p in ours16.named_parameters():  # the loader's policy: norms and tables stay fp32
        if name.endswith(".scale") or name.endswith(".lin"):
            p.data = p.data.float()
    img, context, t, pos = random_inputs(cfg, batch=2, txt_len=6, rows=4, cols=3)
    with torch.no_grad():
        full = ours32(img, context, t, pos)
        half = ours16(img.bfloat16(), context.bfloat16(), t, pos)  # t stays fp32 for the comparison
    assert half.dtype == torch.bfloat16
    assert rel_err(half.float(), full) <= 2e-2


def test_rejects_inputs_of_the_wrong_shape():
    cfg = CONFIGS["gqa2"]
    model = Krea2Transformer(cfg).eval()
    img, context, t, pos = random_inputs(cfg, batch=1, txt_len=4, rows=2, cols=2)
    with pytest.raises(ValueError, match="context must be"):
        model(img, context[:, :, :1], t, pos)
    with pytest.raises(ValueError, match="pos covers"):
        model(img, context, t, pos[:-1])
    with pytest.raises(ValueError, match="mask must be"):
        model(img, context, t, pos, torch.ones(1, 3, dtype=torch.bool))


def test_triton_kernels_give_the_same_transformer_output(spy, monkeypatch):
    """The fused Triton attention (interpreted on CPU) inside the model equals the torch path."""
    import krea2_lite.kernels.fused_attention_triton as fused_mod

    cfg = Krea2Config.tiny(txtdim=64)  # head dim 32 in blocks and text fusion: both kernels apply
    model = ours_from(diffusers_transformer(cfg, seed=9), cfg)
    img, context, t, pos = random_inputs(cfg, batch=2, txt_len=5, rows=3, cols=3)
    mask = torch.ones(2, 5 + 9, dtype=torch.bool)
    mask[1, 2:5] = False
    calls = spy(fused_mod, "fused_attention")
    with torch.no_grad():
        monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
        expected = model(img, context, t, pos, mask)
        assert not calls
        monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
        got = model(img, context, t, pos, mask)
    assert len(calls) == cfg.layers
    assert rel_err(got, expected) <= 1e-4
