"""The VRAM planner (pure arithmetic at the full shape) and the offload executors (tiny pipeline, CPU)."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from krea2_lite import Krea2Config
from krea2_lite.errors import DeviceMemoryError, MemoryPlanError
from krea2_lite.offload import plan_memory
from krea2_lite.offload.planner import GiB, spread
from krea2_lite.offload.sizes import transformer_weights
from krea2_lite.pipeline import Krea2Pipeline
from factories import PIPELINE_CONFIG, tiny_diffusers_pipeline

FULL = Krea2Config.krea2()
HOST = 64  # GiB of host RAM assumed by the budget tests (a workstation); host limits are tested apart


# ---- weights, counted exactly ---------------------------------------------------------------

def test_weight_bytes_are_exact():
    cfg = FULL
    bf16 = transformer_weights(cfg, None, torch.bfloat16)
    # Every parameter in bf16 except norm scales and modulation tables (float32).
    fp32 = sum(n for n in (cfg.features * 6,  # mod.lin
                           2 * cfg.features, 2 * cfg.headdim)) * cfg.layers  # prenorm/postnorm, q/k norm
    assert bf16.total == 2 * cfg.num_parameters() + 2 * (fp32 + _fixed_fp32(cfg))
    int8 = transformer_weights(cfg, "int8", torch.bfloat16)
    linears = (2 * cfg.features ** 2 + cfg.features * cfg.kvheads * cfg.headdim * 2 + cfg.features ** 2
               + 3 * cfg.features * cfg.mlpdim)
    scales = 2 * (4 * cfg.features + 2 * cfg.kvheads * cfg.headdim + 2 * cfg.mlpdim)  # one bf16 per row
    assert int8.blocks[0] == linears + scales + 4 * (6 * cfg.features + 2 * cfg.features + 2 * cfg.headdim)
    int4 = transformer_weights(cfg, "int4", torch.bfloat16)
    groups = linears // 128
    assert int4.blocks[0] == linears // 2 + 2 * 2 * groups + 4 * (8 * cfg.features + 2 * cfg.headdim)
    # The round figures: int8 ≈ 12.8 GB, int4 ≈ 6.8 GB for the whole transformer.
    assert 12.0 < int8.total / GiB < 13.5 and 6.5 < int4.total / GiB < 7.2


def _fixed_fp32(cfg):
    """float32 tensors outside the blocks: text-fusion norm scales, txtmlp norm, last modulation, last norm."""
    fusion = 4 * (2 * cfg.txtdim + 2 * (cfg.txtdim // cfg.txtheads))
    return fusion + cfg.txtdim + 2 * cfg.features + cfg.features


# ---- the budgets named in the issue (full shape, 1024², CFG) ----------------------------------

def test_int4_on_12_gb_is_all_resident():
    plan = plan_memory(FULL, "int4", 12, 1024, 1024, host_ram_gb=HOST)
    assert plan.streamed_blocks == () and len(plan.resident_blocks) == 28
    assert plan.peak_bytes <= 12 * GiB and plan.text_encoder != "device"


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_8bit_on_16_gb_is_all_resident_with_the_text_encoder_leaving(quant):
    plan = plan_memory(FULL, quant, 16, 1024, 1024, host_ram_gb=HOST)
    assert plan.streamed_blocks == ()
    assert plan.text_encoder == "swap"
    assert plan.peak_bytes <= 16 * GiB


@pytest.mark.parametrize("quant,vram", [("int8", 12), ("int4", 8), (None, 16), (None, 24)])
def test_tight_budgets_stream_some_blocks(quant, vram):
    plan = plan_memory(FULL, quant, vram, 1024, 1024, host_ram_gb=HOST)
    assert plan.mode == "sequential"
    assert 0 < len(plan.streamed_blocks) < 28
    assert plan.peak_bytes <= vram * GiB
    assert sorted(plan.resident_blocks + plan.streamed_blocks) == list(range(28))
    # One block more on the device would not fit: the plan streams no more than it must.
    weights = transformer_weights(FULL, quant, torch.bfloat16)
    assert plan.phases["sample"] + max(weights.blocks) > vram * GiB or plan.text_encoder == "cpu"


def test_bf16_streams_more_on_a_smaller_card():
    small = plan_memory(FULL, None, 16, host_ram_gb=HOST)
    large = plan_memory(FULL, None, 24, host_ram_gb=HOST)
    assert len(small.streamed_blocks) > len(large.streamed_blocks)


def test_peak_grows_with_resolution_and_cfg():
    a = plan_memory(FULL, "int4", 40, 1024, 1024, cfg=False, host_ram_gb=HOST)
    b = plan_memory(FULL, "int4", 40, 1024, 1024, cfg=True, host_ram_gb=HOST)
    c = plan_memory(FULL, "int4", 40, 2048, 2048, cfg=True, host_ram_gb=HOST)
    assert a.phases["sample"] < b.phases["sample"] < c.phases["sample"]


def test_plan_prints_readably():
    text = str(plan_memory(FULL, "int8", 12, host_ram_gb=HOST))
    assert "sequential" in text and "blocks resident" in text and "GiB" in text and "text encoder" in text


def test_nothing_fits_says_why():
    with pytest.raises(MemoryPlanError, match="no plan fits 2 GiB"):
        plan_memory(FULL, None, 2, host_ram_gb=HOST)


def test_host_ram_is_counted_and_refused():
    plan = plan_memory(FULL, None, 16, host_ram_gb=HOST)
    assert plan.host_bytes >= sum(transformer_weights(FULL, None, torch.bfloat16).blocks[i]
                                  for i in plan.streamed_blocks)
    with pytest.raises(MemoryPlanError, match="host memory"):
        plan_memory(FULL, None, 16, host_ram_gb=8)


@pytest.mark.parametrize("bad", [0, -1, "12", True])
def test_bad_budget(bad):
    with pytest.raises(ValueError, match="vram_gb"):
        plan_memory(FULL, "int8", bad)


def test_spread_is_even_and_unique():
    assert spread(4, 28) == (3, 10, 17, 24)
    assert spread(28, 28) == tuple(range(28))
    assert spread(0, 28) == ()


# ---- executors on the tiny pipeline (CPU) -----------------------------------------------------

WIDTH, HEIGHT = 64, 48


# Wider and deeper than the other tests' pipeline, so that weights (not activations) dominate
# memory, as in the real model: only then can streaming blocks make a plan smaller.
HEAVY = dataclasses.replace(PIPELINE_CONFIG, features=256, heads=4, kvheads=2, layers=6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload") / "pipe"
    tiny_diffusers_pipeline(transformer_config=HEAVY).save_pretrained(root)
    return root


def _pixels(pipe, **kwargs):
    out = pipe(["a red fox", "a cat"], width=WIDTH, height=HEIGHT, steps=3, guidance=2.0, seed=3,
               max_sequence_length=32, progress=False, **kwargs)
    return np.stack([np.asarray(im) for im in out.images]), out.latents


@pytest.fixture(scope="module")
def reference(saved):
    pipe = Krea2Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32, offload="none", progress=False)
    return _pixels(pipe)


@pytest.mark.parametrize("mode,prefetch", [("sequential", 1), ("sequential", 2), ("model", 1)])
def test_offload_gives_the_identical_image(saved, reference, mode, prefetch):
    pipe = Krea2Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32, offload=mode, prefetch=prefetch,
                                         progress=False)
    plan = pipe.memory_plan
    assert plan.mode == mode
    if mode == "sequential":
        assert plan.streamed_blocks == tuple(range(pipe.transformer.config.layers))
        assert len(pipe.offloader.streamer.device_flat) == prefetch + 1
    pixels, latents = _pixels(pipe)
    assert torch.equal(latents, reference[1])
    assert np.array_equal(pixels, reference[0])


def test_streamed_blocks_share_reused_slots_and_keep_their_state_dict(saved):
    pipe = Krea2Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32, offload="sequential",
                                         progress=False)
    streamer = pipe.offloader.streamer
    assert len(streamer.device_flat) == 2  # prefetch 1 → two slots for every streamed block
    slot_ptrs = [flat.data_ptr() for flat in streamer.device_flat]
    size = streamer.layout.size
    seen = []

    def where(module, args):  # runs after the streamer's own pre-hook: the block's weight must be in a slot
        ptr = module.attn.wq.weight.data_ptr()
        seen.append(next((k for k, base in enumerate(slot_ptrs) if base <= ptr < base + size), None))

    handles = [block.register_forward_pre_hook(where) for block in pipe.transformer.blocks]
    _pixels(pipe)
    for handle in handles:
        handle.remove()
    layers = pipe.transformer.config.layers
    assert seen == [i % 2 for i in range(layers)] * (len(seen) // layers) and len(seen) == 3 * layers
    assert [flat.data_ptr() for flat in streamer.device_flat] == slot_ptrs  # allocated once, reused
    # Between uses each block points at its own host copy, so state_dict() is right.
    reference = Krea2Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32, offload="none",
                                              progress=False).transformer.state_dict()
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_out_of_memory_replans_once_then_succeeds(saved, reference):
    pipe = Krea2Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32, offload="none", progress=False)
    block = pipe.transformer.blocks[0]
    original = block.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    block.forward = flaky
    with pytest.warns(RuntimeWarning, match="retrying once with a smaller memory plan"):
        pixels, latents = _pixels(pipe)
    assert pipe.memory_plan is not None and pipe.memory_plan.mode != "none"
    assert torch.equal(latents, reference[1]) and np.array_equal(pixels, reference[0])


def test_out_of_memory_twice_is_a_clear_error(saved):
    pipe = Krea2Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32, offload="none", progress=False)

    def always(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    pipe.transformer.blocks[1].forward = always
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(DeviceMemoryError, match="also after re-planning"):
            _pixels(pipe)


def test_bad_offload_arguments(saved):
    with pytest.raises(ValueError, match="offload must be one of"):
        Krea2Pipeline.from_pretrained(saved, device="cpu", offload="disk")
    with pytest.raises(ValueError, match="vram_gb"):
        Krea2Pipeline.from_pretrained(saved, device="cpu", vram_gb=-3)


def test_each_call_is_planned_for_its_shape(saved):
    """Planned to a budget, the pipeline re-plans when a call's size changes what fits."""
    probe = Krea2Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32, offload="none", progress=False)
    small = probe.plan(None, mode="none", width=64, height=48, cfg=True, num_images=2, max_sequence_length=32)
    large = probe.plan(None, mode="none", width=128, height=128, cfg=True, num_images=2, max_sequence_length=32)
    assert large.peak_bytes > 1.2 * small.peak_bytes
    budget = small.peak_bytes * 1.1 / 0.9 / GiB  # room for the small call's "none" plan and its reserve
    pipe = Krea2Pipeline.from_pretrained(saved, device="cpu", dtype=torch.float32, vram_gb=budget, progress=False)
    kwargs = dict(steps=1, guidance=2.0, seed=3, max_sequence_length=32, progress=False)
    pipe(["a red fox", "a cat"], width=64, height=48, **kwargs)
    assert pipe.memory_plan.mode == "none"
    got = pipe(["a red fox", "a cat"], width=128, height=128, **kwargs)
    assert pipe.memory_plan.mode != "none" and pipe.memory_plan.peak_bytes <= budget * GiB
    expected = probe(["a red fox", "a cat"], width=128, height=128, **kwargs)
    assert torch.equal(got.latents, expected.latents)


def test_plan_counts_extra_device_bytes():
    base = plan_memory(FULL, "int8", 16, host_ram_gb=HOST)
    with_lora = plan_memory(FULL, "int8", 16, host_ram_gb=HOST, extra_device_bytes=256 << 20)
    assert with_lora.phases["sample"] == base.phases["sample"] + (256 << 20)
