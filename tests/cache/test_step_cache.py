"""Step caching (krea2_lite.cache) on the trained demo model: semantics, offload, composition, CLI."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from krea2_lite.cache import CacheSpec, CacheState, attach_cache, parse_cache
from krea2_lite.errors import ArgumentError
from krea2_lite.pipeline import Krea2Pipeline

# Two prompts of unequal length (and CFG's empty negative): compacted text with a key mask.
PROMPTS = ["a red circle at the top left on a blue background", "a green square"]
STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def _threads(single_thread):
    yield


def demo(**kwargs):
    return Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False, **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return demo()


def generate(pipe, cache=None, prompts=PROMPTS[:1], steps=STEPS, **kwargs):
    return pipe(prompts, steps=steps, guidance=3.5, seed=5, progress=False, cache=cache, **kwargs)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of latents (scale: their own peak)."""
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(float(b.abs().max()) ** 2 / mse)


# ---- the spec --------------------------------------------------------------------------------
def test_spec_strings_round_trip_and_bad_ones_are_named():
    spec = parse_cache("taylor:2,threshold=0.25,warmup=3,max-skip=4")
    assert (spec.method, spec.order, spec.threshold, spec.warmup, spec.max_skip) == ("taylor", 2, 0.25, 3, 4)
    for text in ("fbcache", "fbcache:0.08,first=2,tail=0", "taylor", spec.name):
        assert parse_cache(parse_cache(text).name) == parse_cache(text)
    assert parse_cache("none") is None and parse_cache(None) is None
    assert parse_cache(CacheSpec("fbcache", 0.3)).threshold == 0.3
    for bad, match in [("magcache:1", "unknown method"), ("fbcache:x", "threshold must be a number"),
                       ("taylor:0", "order must be in 1..3"), ("fbcache:0.1,speed=2", "'speed=2' is not KEY=VALUE"),
                       ("fbcache:-1", r"threshold must be a finite number"), ("fbcache:0.1,max_skip=0", "max_skip"),
                       ("fbcache:0.1,order=1", "order must be in 0..0")]:
        with pytest.raises(ArgumentError, match=match):
            parse_cache(bad)
    with pytest.raises(TypeError):
        parse_cache(0.1)


# ---- semantics -------------------------------------------------------------------------------
def test_no_cache_is_todays_path_and_a_cache_leaves_nothing_behind(pipe):
    before = generate(pipe)
    assert before.block_evaluations == before.block_evaluations_total == STEPS * 4
    assert "cache" not in before.metadata[0]
    cached = generate(pipe, "fbcache:0.2,warmup=2,tail=1")
    assert cached.block_evaluations < cached.block_evaluations_total == STEPS * 4
    assert cached.metadata[0]["cache"] == "fbcache:0.2,first=1,warmup=2,tail=1,max_skip=3"
    assert type(pipe.transformer.blocks) is nn.ModuleList
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    assert torch.equal(generate(pipe).latents, before.latents)


@pytest.mark.parametrize("spec", ["fbcache:0", "taylor:2,threshold=0,first=2"])
def test_threshold_zero_never_skips_and_is_bit_identical(pipe, spec):
    out = generate(pipe, spec, prompts=PROMPTS)
    assert out.block_evaluations == out.block_evaluations_total
    assert torch.equal(out.latents, generate(pipe, prompts=PROMPTS).latents)


def test_warmup_tail_and_max_skip_bound_the_skips(pipe):
    spec = parse_cache("fbcache:10,warmup=3,tail=2,max_skip=2")  # skips whenever it is allowed
    with attach_cache(pipe.transformer, spec, steps=12) as cache:
        pipe(PROMPTS[0], steps=12, guidance=3.5, progress=False)
    state = cache.state
    assert state.skips == [False] * 3 + [True, True, False, True, True, False, True] + [False] * 2
    assert (state.evaluated, state.total) == (7 * 4 + 5 * 1, 12 * 4)
    assert state.saved == pytest.approx(15 / 48)


def step_inputs(cfg):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 16, cfg.in_channels, generator=g)
    context = torch.randn(2, 5, cfg.txtlayers, cfg.txtdim, generator=g)
    pos = torch.zeros(21, 3)
    pos[5:, 1] = torch.arange(16).float()
    return img, context, torch.full((2,), 0.5), pos


def assert_skip_adds_the_residual(model):
    """The same input twice: the second forward's first-block residual is unchanged, so it skips, and
    x_F + (x_L − x_F) of the first forward is its output."""
    img, context, t, pos = step_inputs(model.config)
    with torch.no_grad():
        full = model(img, context, t, pos)
        with attach_cache(model, parse_cache("fbcache:0.01,warmup=0")) as cache:
            first = model(img, context, t, pos)
            second = model(img, context, t, pos)
    assert cache.state.skips == [False, True]
    assert torch.equal(first, full)
    torch.testing.assert_close(second, full, rtol=1e-5, atol=1e-5)


def test_a_skipped_step_adds_the_cached_residual(pipe):
    assert_skip_adds_the_residual(pipe.transformer)


def test_taylor_extrapolates_polynomials_exactly():
    state = CacheState(parse_cache("taylor:2"), layers=4)
    residual = lambda t: torch.tensor([1.0, -2.0]) + 3 * t + 0.5 * t * t  # noqa: E731
    for t in (0.9, 0.8, 0.6):
        state.computed(t, torch.zeros(2), residual(torch.tensor(t)))
    torch.testing.assert_close(state.predict(0.45), residual(torch.tensor(0.45)))
    reuse = CacheState(parse_cache("fbcache:0.1"), layers=4)
    for t in (0.9, 0.8):
        reuse.computed(t, torch.zeros(2), residual(torch.tensor(t)))
    assert torch.equal(reuse.predict(0.45), residual(torch.tensor(0.8)))


def test_trained_model_saves_blocks_at_high_quality(pipe):
    reference = generate(pipe, steps=52)
    for spec in ("fbcache", "taylor"):
        out = generate(pipe, spec, steps=52)
        assert out.block_evaluations_total == 52 * len(pipe.transformer.blocks), spec
        assert out.block_evaluations < 0.7 * out.block_evaluations_total, spec  # over 30% of the blocks skipped
        assert psnr(out.latents, reference.latents) > 25, spec


def test_turbo_warns_that_it_gains_little():
    turbo = demo(variant="turbo")
    with pytest.warns(UserWarning, match="8-step distilled model"):
        turbo("a red circle", steps=2, progress=False, cache="fbcache")


# ---- offload ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [1, 2])
def test_streamed_skipped_blocks_are_never_copied(pipe, prefetch):
    streamed = demo(offload="sequential", prefetch=prefetch)
    streamer = streamed.offloader.streamer
    assert streamer.order == [0, 1, 2, 3]
    generate(streamed)
    assert streamer.copies == STEPS * 4
    streamer.copies = 0
    spec = "fbcache:0.2,warmup=2,tail=1"
    out = generate(streamed, spec)
    skipped = (out.block_evaluations_total - out.block_evaluations) // 3  # each skip spares blocks 1..3
    assert skipped > 0
    assert streamer.copies == out.block_evaluations == (STEPS - skipped) * 4 + skipped * 1
    assert torch.equal(out.latents, generate(pipe, spec).latents)  # the same decisions as resident
    assert streamer.gate_at is None  # the cache handed the streamer back


def test_the_memory_plan_counts_the_cache(pipe):
    from krea2_lite.cache.state import device_bytes

    spec = parse_cache("taylor:2")
    assert device_bytes(spec, 2, 100, 64, 2) == 2 * 100 * 64 * (2 * 5 + 4)
    plain = pipe.plan(8.0, mode="sequential", width=64, height=64)
    cached = pipe.plan(8.0, mode="sequential", width=64, height=64, extra_device_bytes=10 << 20)
    assert cached.peak_bytes == plain.peak_bytes + (10 << 20)


def test_a_mixed_plan_copies_only_the_blocks_that_run():
    """Blocks 1 and 3 streamed, 0 and 2 resident, prefetch 2: a computed step copies both, a skipped
    one neither (block 1 would be prefetched while block 0 runs, were it not held)."""
    from krea2_lite.offload.block_streamer import BlockStreamer

    model = demo().transformer
    inputs = step_inputs(model.config)
    with torch.no_grad():
        expected = model(*inputs)
        streamer = BlockStreamer(model, model.blocks, [1, 3], "cpu", prefetch=2)
        with attach_cache(model, parse_cache("fbcache:0.01,warmup=0"), gate=streamer) as cache:
            outputs = [model(*inputs) for _ in range(3)]
        assert cache.state.skips == [False, True, True]
        assert streamer.copies == 2
        assert torch.equal(model(*inputs), expected) and streamer.copies == 4  # gate handed back
        streamer.close()
    assert torch.equal(outputs[0], expected)


# ---- composition -----------------------------------------------------------------------------
def lora_file(folder, model) -> str:
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, module in model.named_modules():
        if name.startswith("blocks.") and hasattr(module, "in_features") and not name.endswith("lowrank"):
            tensors[f"{name}.lora_A"] = torch.randn(4, module.in_features, generator=g) / module.in_features ** 0.5
            tensors[f"{name}.lora_B"] = torch.randn(module.out_features, 4, generator=g) * 0.05
    path = folder / "demo_lora.safetensors"
    save_file(tensors, path, metadata={"rank": "4", "lora_alpha": "4", "lora_scale": "1.0"})
    return str(path)


@pytest.mark.parametrize("quant", ["lora", "int8+lora", "int8-w8a8", "int4-lr8"])
def test_cache_composes(quant, tmp_path):
    """Weights quantized (int8, W8A8, int4-lr) and/or with a LoRA: a cached generation that never skips
    is the same model exactly, and a skipped step returns what the blocks would have."""
    weights = quant.replace("lora", "").strip("+") or None
    model = demo(quant=weights)
    if "lora" in quant:
        model.load_lora(lora_file(tmp_path, model.transformer), scale=2.0)
    run = lambda cache=None: generate(model, cache, steps=6)  # noqa: E731
    reference = run()
    assert torch.equal(run("fbcache:0").latents, reference.latents)
    assert_skip_adds_the_residual(model.transformer)
    if "lora" in quant:
        model.set_lora_scale(0.0)
        assert not torch.allclose(run().latents, reference.latents, atol=1e-3)  # the LoRA did apply


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_cache_flag_and_from_png_reproduce_it(tmp_path, capsys):
    from PIL import Image

    from krea2_lite.cli.subcommands import main
    from krea2_lite.metadata import read_png_metadata

    first, again, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    common = ["--steps", "12", "--quiet", "--device", "cpu"]
    assert main(["generate", "a red circle", "--model", "demo", "--output", str(first),
                 "--cache", "fbcache:0.2,warmup=2", *common]) == 0
    assert read_png_metadata(first)["cache"] == "fbcache:0.2,first=1,warmup=2,tail=2,max_skip=3"
    assert main(["generate", "--from-png", str(first), "--output", str(again), *common]) == 0
    assert read_png_metadata(again)["cache"] == read_png_metadata(first)["cache"]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert main(["generate", "--from-png", str(first), "--output", str(plain), "--cache", "none", *common]) == 0
    assert "cache" not in read_png_metadata(plain)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--model", "demo", "--cache", "fbcache:abc"])
    assert exit_info.value.code == 2
    assert "threshold must be a number" in capsys.readouterr().err


# ---- with features merged beside the cache: images in, GGUF files ----------------------------
def test_cache_with_an_input_image_counts_the_steps_it_runs(pipe):
    """img2img runs only the schedule's tail: the cache's warm-up / tail and the reported block
    evaluations follow the steps actually run; a never-skipping cache is the uncached image exactly."""
    start = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(image=start, strength=0.5, steps=STEPS)
    plain = generate(pipe, **kwargs)
    blocks = len(pipe.transformer.blocks)
    assert plain.block_evaluations == plain.block_evaluations_total == (STEPS // 2) * blocks
    assert torch.equal(generate(pipe, "fbcache:0", **kwargs).latents, plain.latents)
    cached = generate(pipe, "fbcache:10,warmup=1,tail=1", **kwargs)
    run = STEPS // 2
    assert cached.block_evaluations_total == run * blocks
    # 6 steps run: step 1 warm-up, step 6 tail, steps 2-4 skipped (max_skip 3), step 5 computed. Had the
    # cache counted the call's 12 steps, the tail would lie beyond the run and step 6 would skip too.
    skipped = 3
    assert cached.block_evaluations == (run - skipped) * blocks + skipped * 1  # a skipped step runs `first`


def test_cache_over_a_streamed_gguf_transformer(tmp_path):
    """A GGUF transformer streamed block by block, cached: a never-skipping cache is the uncached image."""
    from gguf_files import model_gguf
    from krea2_lite import load_transformer
    from krea2_lite.demo import demo_path

    state = {k: v.detach().float().contiguous()
             for k, v in load_transformer(demo_path() / "transformer", dtype=torch.float32).state_dict().items()}
    path = model_gguf(tmp_path / "demo-Q8_0.gguf", state, "Q8_0")[0]
    streamed = demo(transformer=path, offload="sequential")
    reference = generate(streamed, steps=6)
    assert torch.equal(generate(streamed, "fbcache:0", steps=6).latents, reference.latents)
    assert_skip_adds_the_residual(streamed.transformer)
