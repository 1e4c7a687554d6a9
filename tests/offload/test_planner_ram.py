"""The planner against both budgets (device and host RAM), and the drop-and-reload text encoder."""

import gc
import weakref

import numpy as np
import pytest
import torch

from krea2_lite import Krea2Config
from krea2_lite.errors import MemoryPlanError
from krea2_lite.offload import plan_memory
from krea2_lite.offload.planner import GiB, HOST_RESERVE_BYTES
from krea2_lite.offload.reload import is_dropped
from krea2_lite.offload.sizes import (pinned_size, text_encoder_largest_tensor_bytes, text_encoder_pinned_bytes,
                                     text_encoder_weight_bytes, transformer_weights)

FULL = Krea2Config.krea2()


def _pinned_streamed(plan, quant):
    weights = transformer_weights(FULL, quant, torch.bfloat16)
    return sum(weights.pinned_streamed[i] for i in plan.streamed_blocks)


# ---- the machines named in issue 15 (full shape, 1024², CFG) ----------------------------------

@pytest.mark.parametrize("quant,vram,ram", [("int8", 12, 16), (None, 16, 24), ("int4", 8, 16)])
def test_a_placement_fits_card_and_ram(quant, vram, ram):
    plan = plan_memory(FULL, quant, vram, host_ram_gb=ram)
    assert plan.peak_bytes <= vram * GiB and plan.host_bytes <= ram * GiB
    assert plan.host_budget_bytes == ram * GiB
    assert not plan.transformer_leaves_for_encoding  # parking the resident transformer needs RAM these lack
    assert plan.text_encoder in ("reload", "cpu")  # a pinned copy of Qwen3-VL (10.3 GiB) does not fit beside the blocks
    # The plan chosen for unlimited RAM fits the card but not this RAM: the search went past it.
    roomy = plan_memory(FULL, quant, vram, host_ram_gb=512)
    same = (roomy.streamed_blocks, roomy.text_encoder) == (plan.streamed_blocks, plan.text_encoder)
    assert roomy.host_bytes > ram * GiB or same


def test_the_ram_limit_changes_the_choice():
    """int8 on a 12 GiB card: with plenty of RAM the transformer steps out to pinned memory while Qwen3-VL
    encodes; with 16 GiB the encoder is re-read from its files instead and more blocks stream."""
    roomy = plan_memory(FULL, "int8", 12, host_ram_gb=64)
    tight = plan_memory(FULL, "int8", 12, host_ram_gb=16)
    assert roomy.text_encoder == "swap" and roomy.host_bytes > 16 * GiB
    assert tight.text_encoder == "reload" and len(tight.streamed_blocks) > len(roomy.streamed_blocks)
    assert tight.text_reload_bytes == tight.parts["text_encoder"] > 7 * GiB
    assert roomy.text_reload_bytes == 0


def test_without_a_reloadable_encoder_the_cpu_takes_it():
    plan = plan_memory(FULL, "int8", 12, host_ram_gb=16, text_encoder_reloadable=False)
    assert plan.text_encoder == "cpu" and plan.host_bytes <= 16 * GiB
    with pytest.raises(ValueError, match="text_encoder_place='reload'"):
        plan_memory(FULL, "int8", 12, text_encoder_place="reload", text_encoder_reloadable=False)


# ---- host bytes, phase by phase ---------------------------------------------------------------

def test_pinned_allocations_are_counted_as_the_host_allocator_takes_them():
    assert [pinned_size(n) for n in (0, 1, 4096, 4097, 3 << 20)] == [0, 1, 4096, 8192, 4 << 20]
    int8 = transformer_weights(FULL, "int8", torch.bfloat16)
    assert int8.pinned_streamed[0] == 1 << 29  # a 0.40 GiB int8 block takes a 0.5 GiB pinned buffer
    assert int8.blocks[0] < int8.pinned_streamed[0] < int8.pinned_swapped[0]  # tensor by tensor rounds more
    assert text_encoder_pinned_bytes(torch.bfloat16) > 1.3 * text_encoder_weight_bytes(torch.bfloat16)


def test_host_bytes_of_each_text_encoder_placement():
    te, te_pinned = 7 * GiB, 9 * GiB
    common = dict(host_ram_gb=512, text_encoder_bytes=te, text_encoder_pinned_bytes=te_pinned)
    reload = plan_memory(FULL, "int8", 12, text_encoder_place="reload", **common)
    # Pinned streamed blocks + the process reserve; the re-read encoder is page cache, bar one tensor in flight.
    assert reload.host_phases["sample"] == _pinned_streamed(reload, "int8") + HOST_RESERVE_BYTES
    assert reload.host_phases["encode"] == reload.host_phases["sample"] + text_encoder_largest_tensor_bytes(
        torch.bfloat16)
    cpu = plan_memory(FULL, "int8", 12, text_encoder_place="cpu", **common)
    assert cpu.host_phases["sample"] == _pinned_streamed(cpu, "int8") + te + HOST_RESERVE_BYTES
    assert cpu.host_phases["encode"] == cpu.host_phases["sample"] + cpu.parts["text_encoder_activations"]
    swap = plan_memory(FULL, "int8", 12, text_encoder_place="swap", **common)  # the transformer steps out
    weights = transformer_weights(FULL, "int8", torch.bfloat16)
    resident = weights.pinned_fixed + sum(weights.pinned_swapped[i] for i in swap.resident_blocks)
    assert swap.transformer_leaves_for_encoding
    assert swap.host_bytes == _pinned_streamed(swap, "int8") + te_pinned + resident + HOST_RESERVE_BYTES
    everything = plan_memory(FULL, "int4", 40, **common)
    assert everything.mode == "none" and everything.host_bytes == HOST_RESERVE_BYTES
    assert reload.host_bytes == max(reload.host_phases.values())


def test_reload_costs_the_same_device_bytes_as_a_swap():
    common = dict(mode="sequential", text_encoder_bytes=7 * GiB, text_encoder_pinned_bytes=9 * GiB, host_ram_gb=512)
    reload = plan_memory(FULL, None, 40, text_encoder_place="reload", **common)
    swap = plan_memory(FULL, None, 40, text_encoder_place="swap", **common)
    assert reload.phases == swap.phases and reload.streamed_blocks == swap.streamed_blocks
    assert swap.host_bytes - reload.host_bytes == 9 * GiB - text_encoder_largest_tensor_bytes(torch.bfloat16)
    assert "read per call" in str(reload) and "host" in str(reload)


def test_a_quantized_text_encoder_adds_its_dequantization_scratch_to_encoding():
    common = dict(mode="sequential", text_encoder_place="swap", host_ram_gb=512)
    plain = plan_memory(FULL, "int8", 40, **common)
    quantized = plan_memory(FULL, "int8", 40, text_encoder_quantized=True, **common)
    scratch = 2560 * 9728 * 2  # Qwen3-VL-4B's MLP matrix dequantized to bf16
    assert quantized.phases["encode"] - plain.phases["encode"] == scratch
    assert quantized.phases["sample"] == plain.phases["sample"]


def test_the_pipeline_tells_the_planner_its_encoder_is_quantized(monkeypatch, single_thread):
    import krea2_lite.pipeline as pipeline_module
    from krea2_lite.quantize.text_encoder import quantize_text_encoder_

    calls = []
    real = pipeline_module.plan_memory
    monkeypatch.setattr(pipeline_module, "plan_memory", lambda *a, **k: calls.append(k) or real(*a, **k))
    pipe = pipeline_module.Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False)
    pipe.plan(None, mode="model", host_ram_gb=512)
    assert calls[-1]["text_encoder_quantized"] is False
    quantize_text_encoder_(pipe.text_encoder, "int8")
    pipe.plan(None, mode="model", host_ram_gb=512)
    assert calls[-1]["text_encoder_quantized"] is True


# ---- nothing fits: which limit binds -----------------------------------------------------------

def test_device_binds():
    with pytest.raises(MemoryPlanError, match="no plan fits 2 GiB") as info:
        plan_memory(FULL, None, 2, host_ram_gb=512)
    assert info.value.limit == "device" and "closest on device memory" in str(info.value)


def test_host_binds():
    with pytest.raises(MemoryPlanError, match=r"no plan fits 1\.50 GiB of host RAM \(host_ram_gb\)") as info:
        plan_memory(FULL, "int4", 24, host_ram_gb=1.5)  # below the process reserve alone
    assert info.value.limit == "host" and "closest on host memory" in str(info.value)


def test_both_bind():
    with pytest.raises(MemoryPlanError, match="no plan fits both 16 GiB of device memory") as info:
        plan_memory(FULL, None, 16, host_ram_gb=8)
    message = str(info.value)
    assert info.value.limit == "both" and "each budget alone could be met" in message
    assert "closest on device memory" in message and "closest on host memory" in message
    with pytest.raises(MemoryPlanError, match="neither budget can be met") as info:
        plan_memory(FULL, None, 2, host_ram_gb=1)
    assert info.value.limit == "both"


@pytest.mark.parametrize("bad", [0, -2, float("nan"), float("inf"), "16", True])
def test_bad_host_ram(bad):
    with pytest.raises(ValueError, match="host_ram_gb"):
        plan_memory(FULL, "int8", 12, host_ram_gb=bad)


def test_bad_text_encoder_place():
    with pytest.raises(ValueError, match="text_encoder_place"):
        plan_memory(FULL, "int8", 12, text_encoder_place="disk")


# ---- the drop-and-reload text encoder on the demo model (CPU) ---------------------------------

@pytest.fixture(scope="module")
def demo_reference():
    from krea2_lite.pipeline import Krea2Pipeline

    pipe = Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False)
    return pipe, _generate(pipe)


def _generate(pipe):
    out = pipe("a red circle", steps=2, seed=5, max_sequence_length=16, progress=False)
    return np.stack([np.asarray(im) for im in out.images]), out.latents


def _reload_budget(pipe) -> float:
    """A host budget between the reloading plan's need and the swapping one's, so the planner must reload."""
    swap = pipe.plan(None, mode="model", text_encoder_place="swap", host_ram_gb=512)
    reload = pipe.plan(None, mode="model", text_encoder_place="reload", host_ram_gb=512)
    assert reload.host_bytes < swap.host_bytes
    return (reload.host_bytes + swap.host_bytes) / 2 / GiB


def test_reloaded_text_encoder_gives_the_identical_image_and_is_freed(demo_reference):
    from krea2_lite.pipeline import Krea2Pipeline

    resident, (pixels, latents) = demo_reference
    budget = _reload_budget(resident)
    pipe = Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, offload="model",
                                         host_ram_gb=budget, progress=False)
    assert pipe.memory_plan.text_encoder == "reload"
    assert pipe.memory_plan.host_budget_bytes == int(budget * GiB)
    assert is_dropped(pipe.text_encoder)  # nothing held between calls, from the start

    loaded = []  # weak references to every tensor a reload brings in
    loader = pipe.text_encoder_loader

    def watched(**kwargs):
        fresh = loader(**kwargs)
        loaded.extend(weakref.ref(t) for t in (*fresh.parameters(), *fresh.buffers()))
        return fresh

    pipe.text_encoder_loader = pipe.offloader.text_reload.loader = watched
    for _ in range(2):  # each call reads the encoder again and gives the same image
        got_pixels, got_latents = _generate(pipe)
        assert torch.equal(got_latents, latents) and np.array_equal(got_pixels, pixels)
        gc.collect()
        assert is_dropped(pipe.text_encoder)
        assert loaded and all(ref() is None for ref in loaded)  # the weights read for the call are gone
    assert pipe.offloader.text_reload.reads == 2
    # Another plan after a reload one reads the encoder back into host memory first.
    pipe.apply_plan(pipe.plan(None, mode="model", text_encoder_place="cpu", host_ram_gb=512))
    assert not is_dropped(pipe.text_encoder) and pipe.memory_plan.text_encoder == "cpu"
    got_pixels, got_latents = _generate(pipe)
    assert torch.equal(got_latents, latents) and np.array_equal(got_pixels, pixels)


def test_a_pipeline_without_its_files_never_plans_a_reload(demo_reference):
    from krea2_lite.pipeline import Krea2Pipeline

    resident, _ = demo_reference
    pipe = Krea2Pipeline(resident.transformer, resident.text_encoder, resident.vae)
    assert pipe.text_encoder_loader is None
    assert pipe.plan(None, mode="model", host_ram_gb=512).text_encoder == "swap"
    with pytest.raises(MemoryPlanError) as info:  # only a reload would fit this RAM
        pipe.plan(None, mode="model", host_ram_gb=_reload_budget(resident))
    assert info.value.limit == "host"


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_from_pretrained_checks_host_ram(bad):
    from krea2_lite.pipeline import Krea2Pipeline

    with pytest.raises(ValueError, match="host_ram_gb"):
        Krea2Pipeline.from_pretrained("demo", device="cpu", host_ram_gb=bad)


# ---- the CLI flag ------------------------------------------------------------------------------

def test_cli_ram_gb_is_checked_and_reaches_the_planner(capsys):
    from krea2_lite.cli.subcommands import main

    argv = ["generate", "a red circle", "--model", "demo", "--device", "cpu", "--quiet"]
    assert main(argv + ["--ram-gb", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "host_ram_gb" in err
    # Below the process reserve no plan fits: the planner saw the flag's figure.
    assert main(argv + ["--ram-gb", "0.5", "--offload", "model"]) == 2
    err = capsys.readouterr().err
    assert "0.50 GiB of host RAM (host_ram_gb)" in err
