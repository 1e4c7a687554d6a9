"""LoRA gradients through a frozen quantized linear equal those through a float linear holding its
dequantized weight, for every quant string's layer kind (int8, fp8, int4 groups, W8A8, rotated)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from krea2_lite.quantize.qlinear import QuantizedLinear
from krea2_lite.train.base_model import training_forward
from krea2_lite.train.lora_params import TrainableLora

KINDS = [dict(dtype="int8", group=None), dict(dtype="fp8", group=None), dict(dtype="int4", group=32),
         dict(dtype="int8", group=None, activations="int8"), dict(dtype="fp8", group=None, activations="fp8"),
         dict(dtype="int8", group=None, activations="int8", rotate=32)]


class Holder(nn.Module):
    """A stand-in transformer: `blocks.0.attn.wq` is the layer (what target_modules selects)."""

    def __init__(self, layer):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].attn = nn.Module()
        self.blocks[0].attn.wq = layer

    def forward(self, x):
        return self.blocks[0].attn.wq(x)


def _grads(layer, x):
    model = Holder(layer).requires_grad_(False)
    lora = TrainableLora(model, ["blocks.0.attn.wq"], rank=4, alpha=8.0, seed=3)
    with torch.no_grad():
        for p in lora.parameters():  # B = 0 at init would make A's gradient zero: give both values
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    lora.attach("cpu")
    x = x.clone().requires_grad_(True)
    with training_forward(model, checkpoint_blocks=False):
        out = model(x)
    (out.square().sum() + out.sum()).backward()
    return [p.grad.clone() for p in lora.parameters()] + [x.grad.clone()], out.detach()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(str(v) for v in k.values() if v))
def test_lora_grads_through_quantized_equal_dequantized_float(kind):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    quantized = QuantizedLinear.from_linear(linear, kind["dtype"], kind["group"], compute_dtype=torch.float32,
                                            activations=kind.get("activations"), rotate=kind.get("rotate", 0))
    dense = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        dense.weight.copy_(quantized.dequantize(torch.float32))
        dense.bias.copy_(quantized.bias)
    x = torch.randn(5, 64)
    got, out_q = _grads(quantized, x)
    want, out_d = _grads(dense, x)
    torch.testing.assert_close(out_q, out_d, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert quantized.activations == kind.get("activations")  # restored after training_forward


def test_checkpointed_blocks_give_the_same_gradients():
    from krea2_lite import Krea2Config, Krea2Transformer
    from krea2_lite.sampling import positions

    cfg = Krea2Config.tiny()
    torch.manual_seed(0)
    model = Krea2Transformer(cfg).requires_grad_(False)
    lora = TrainableLora(model, ["blocks.0.attn.wq", "blocks.1.mlp.down"], rank=2, alpha=2.0, seed=0)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    lora.attach("cpu")
    g = torch.Generator().manual_seed(1)
    img, ctx = torch.randn(1, 6, cfg.in_channels, generator=g), torch.randn(1, 3, cfg.txtlayers, cfg.txtdim, generator=g)
    grads = []
    for checkpointing in (False, True):
        lora.zero_grad()
        with training_forward(model, checkpoint_blocks=checkpointing):
            model(img, ctx, torch.tensor([0.5]), positions(3, 2, 3)).square().mean().backward()
        grads.append([p.grad.clone() for p in lora.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert "forward" not in model.blocks[0].__dict__  # the wrapper is undone
