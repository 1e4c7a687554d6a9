"""Streamed training: blocks streamed through reused slots in the forward and again in reverse for the
backward's recompute give the same LoRA gradients as the resident model, with one copy per streamed
block per direction; the training plan picks streaming between the streamed minimum and resident."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from krea2_lite import Krea2Config, Krea2Transformer
from krea2_lite.errors import MemoryPlanError
from krea2_lite.sampling import positions
from krea2_lite.train.base_model import freeze, training_forward
from krea2_lite.train.lora_params import TrainableLora, target_modules
from krea2_lite.train.memory import GiB, check_fits, training_plan
from krea2_lite.train.streaming import StreamedTraining


def _lora_grads(streamed, micro_batches=1):
    cfg = dataclasses.replace(Krea2Config.tiny(), layers=4)
    torch.manual_seed(0)
    model = freeze(Krea2Transformer(cfg))
    lora = TrainableLora(model, target_modules(model, ("attn", "mlp")), rank=2, alpha=2.0, seed=0)
    with torch.no_grad():
        for p in lora.parameters():  # B = 0 at init would leave A without gradient: give both values
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    lora.attach("cpu")
    streaming = StreamedTraining(model, streamed, "cpu") if streamed else None
    where = []  # per call of a streamed block's first linear (forward and recompute): in a device slot?
    for i in streamed:
        model.blocks[i].attn.wq.register_forward_pre_hook(
            lambda m, args: where.append(any(s.data_ptr() <= m.weight.data_ptr() < s.data_ptr() + s.numel()
                                             for s in streaming.streamer.device_flat)))
    g = torch.Generator().manual_seed(1)
    with training_forward(model, streaming=streaming):
        for _ in range(micro_batches):
            img = torch.randn(2, 6, cfg.in_channels, generator=g)
            ctx = torch.randn(2, 3, cfg.txtlayers, cfg.txtdim, generator=g)
            loss = model(img, ctx, torch.tensor([0.3, 0.7]), positions(3, 2, 3).expand(2, -1, -1)).square().mean()
            with streaming.backward() if streaming else torch.enable_grad():
                loss.backward()
    copies = streaming.copies if streaming else 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if streaming:
        streaming.close()
    assert where == [True] * (2 * micro_batches * len(streamed))  # the recompute ran on the device copy too
    return [p.grad.clone() for p in lora.parameters()], copies, state


@pytest.mark.parametrize("streamed", [(1, 3), (0, 1, 2, 3)], ids=["some", "all"])
def test_streamed_backward_gives_the_resident_gradients_with_one_copy_per_direction(streamed):
    want, _, want_state = _lora_grads(())
    got, copies, state = _lora_grads(streamed, micro_batches=2)
    half, _, _ = _lora_grads(streamed, micro_batches=1)
    for g, w, h in zip(got, want, half):
        assert w.abs().sum() > 0
        torch.testing.assert_close(h, w, rtol=0, atol=0)  # the CPU streamed run is bitwise the resident one
        assert not torch.equal(g, w)  # two micro-batches accumulate (and the check can fail)
    assert copies == 2 * 2 * len(streamed)  # per micro-batch: once in the forward, once for the recompute
    for key, value in want_state.items():  # the base weights came back untouched
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


KREA2 = Krea2Config.krea2()
SHAPES = ((6144, 6144),) * 3 + ((6144, 1536),) * 2 + ((6144, 16384),) * 2 + ((16384, 6144),)
PLAN = dict(rank=16, resolution=1024, batch=1, text_tokens=256, dtype=torch.bfloat16, target_shapes=SHAPES)


def test_plan_streams_between_the_streamed_minimum_and_resident_and_refuses_below():
    resident = training_plan(KREA2, "int8", budget_bytes=None, **PLAN)
    minimum = training_plan(KREA2, "int8", budget_bytes=None, streamed=KREA2.layers, **PLAN)
    assert minimum.total < resident.total - 8 * GiB  # streaming saves most of the weights
    # the reserve grows with the budget: pick budgets whose own reserve leaves the wanted room
    between = (minimum.total + resident.total) / 2 / 0.96 / GiB + 0.6
    plan = check_fits(KREA2, "int8", vram_gb=between, ram_gb=None, **PLAN)
    assert plan.streamed_blocks and plan.resident_blocks
    assert plan.total <= between * GiB
    assert sorted(plan.resident_blocks + plan.streamed_blocks) == list(range(KREA2.layers))
    fewer = check_fits(KREA2, "int8", vram_gb=between + 2, ram_gb=None, **PLAN)
    assert len(fewer.streamed_blocks) < len(plan.streamed_blocks)  # more card, fewer blocks streamed
    assert not check_fits(KREA2, "int8", vram_gb=resident.total / 0.96 / GiB + 0.6, ram_gb=None,
                          **PLAN).streamed_blocks
    below = minimum.total / GiB - 1.0
    with pytest.raises(MemoryPlanError, match="even streaming every block") as info:
        check_fits(KREA2, "int8", vram_gb=below, ram_gb=None, **PLAN)
    assert "closest fit" in str(info.value)
    with pytest.raises(MemoryPlanError, match="RAM"):  # streamed blocks live in host RAM: it is counted
        check_fits(KREA2, "int8", vram_gb=between, ram_gb=4, **PLAN)


def test_streamed_training_run_on_the_demo_writes_the_resident_lora(tmp_path):
    from safetensors.torch import load_file

    from krea2_lite.demo import demo_path
    from krea2_lite.loading.pipeline import resolve_pipeline
    from krea2_lite.train import train_lora

    from test_train_demo import OPTIONS, write_scene_folder  # tests/train is on sys.path (pytest's rootdir mode)

    data = write_scene_folder(tmp_path / "data", 2)
    cfg = resolve_pipeline(str(demo_path()), quant="int8").config
    kv = cfg.kvheads * cfg.headdim
    shapes = ((cfg.features, cfg.features),) * 3 + ((cfg.features, kv),) * 2  # attn: wq wo gate, wk wv
    plan = dict(rank=2, resolution=64, batch=2, text_tokens=256, dtype=torch.float32, target_shapes=shapes)
    resident = training_plan(cfg, "int8", budget_bytes=None, **plan).total
    minimum = training_plan(cfg, "int8", budget_bytes=None, streamed=cfg.layers, **plan).total
    vram_gb = ((resident + minimum) / 2 + 0.5 * GiB) / 0.96 / GiB  # the reserve: 0.5 GiB + 4 % of the budget
    run = dict(steps=2, batch=2, quant="int8", cache_dir=tmp_path / "cache", **OPTIONS)
    want = load_file(train_lora(str(demo_path()), data=data, output=tmp_path / "r.safetensors", **run))
    messages = []
    got = load_file(train_lora(str(demo_path()), data=data, output=tmp_path / "s.safetensors", vram_gb=vram_gb,
                               **{**run, "log": messages.append}))
    assert any(f"{cfg.layers - 1} of {cfg.layers} blocks streamed" in m for m in messages)
    assert any(v.abs().sum() > 0 for k, v in want.items() if "lora_B" in k)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)  # bitwise on the CPU
