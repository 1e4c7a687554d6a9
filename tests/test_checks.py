"""Reliability battery, argument bounds: everything a user passes to Krea2Pipeline.__call__ /
from_pretrained is bounded (krea2_lite/checks.py) and refused before any work, with a message
naming the argument and its allowed range."""

import json

import pytest
import torch

from krea2_lite import checks
from krea2_lite.errors import ArgumentError, ArgumentTypeError
from krea2_lite.pipeline import Krea2Pipeline
from reliability_fixtures import copy_of, pipeline_folder, snapshot


@pytest.fixture(scope="module")
def pipe():
    return Krea2Pipeline.from_pretrained(pipeline_folder(), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture
def no_work(pipe, monkeypatch):
    """Fail the test if a refused call reaches the text encoder."""
    def boom(*args, **kwargs):
        raise AssertionError("the call started working before checking its arguments")

    monkeypatch.setattr(pipe.text_encoder, "encode", boom)
    return pipe


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=10 ** 9), ArgumentError, r"steps must be in 1\.\.1000, got 1000000000"),
    (dict(steps=2.5), ArgumentTypeError, r"steps must be an int in 1\.\.1000, got 2\.5"),
    (dict(max_sequence_length=10 ** 7), ArgumentError, r"max_sequence_length must be in 1\.\.\d+, got 10000000"),
    (dict(mu=1000.0), ArgumentError, r"mu must be a finite number in \[-20\.0, 20\.0\], got 1000\.0"),
    (dict(mu=float("nan")), ArgumentError, r"mu must be a finite number .* got nan"),
    (dict(seed=2 ** 64), ArgumentError, r"seed must be in 0\.\.18446744073709551614, got 18446744073709551616"),
    (dict(seed=2 ** 64 - 2, num_images=2), ArgumentError, r"seed must be in 0\.\.18446744073709551613"),
    (dict(seed=-1), ArgumentError, r"seed must be in 0\.\."),
    (dict(seed=1.5), ArgumentTypeError, r"seed must be an int in 0\.\."),
    (dict(seed=True), ArgumentTypeError, r"seed must be an int"),
    (dict(guidance=float("inf")), ArgumentError, r"guidance must be a finite number in \[0\.0, 100\.0\], got inf"),
    (dict(num_images=10 ** 6), ArgumentError, r"num_images must be in 1\.\.64"),
    (dict(latents=torch.zeros(1, 16, 4, 4, dtype=torch.int64)), ArgumentTypeError,
     "latents must be a floating-point tensor, got torch.int64"),
    (dict(latents=torch.zeros(1, 16, 4, 4, device="meta")), ArgumentError, "latents are on the meta device"),
    (dict(latents=[[0.0]]), ArgumentTypeError, r"latents must be a torch\.Tensor of shape \(1, 16, 4, 4\), got list"),
])
def test_call_arguments_are_bounded(no_work, kwargs, error, match):
    args = dict(width=32, height=32, steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        no_work("a cat", **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(vram_gb=float("inf")), r"vram_gb must be a finite number in \(0\.0, 1048576\]"),
    (dict(vram_gb=-2), r"vram_gb must be a finite number in \(0\.0"),
    (dict(device="bogus"), r"device must be 'cpu', 'cuda' or 'cuda:N', got 'bogus'"),
    (dict(device="meta"), r"device='meta' holds no data"),
])
def test_from_pretrained_arguments_are_bounded(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        Krea2Pipeline.from_pretrained(pipeline_folder(), progress=False, **kwargs)


def test_cuda_device_without_cuda_is_named():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ArgumentError, match="device 'cuda:3': CUDA is not available"):
        checks.check_device("cuda:3")


@pytest.mark.parametrize("own, match", [
    ({"steps": 10 ** 9, "guidance": 2.0}, r"krea2_lite\.steps must be in 1\.\.1000"),
    ({"steps": 3, "guidance": float("nan")}, r"krea2_lite\.guidance must be a finite number"),
    ({"width": 0}, r"krea2_lite\.width must be in 16\.\.4096"),
])
def test_folder_defaults_are_bounded(tmp_path, own, match):
    folder = copy_of(pipeline_folder(), tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, krea2_lite=own)))
    before = snapshot(folder)
    with pytest.raises(ArgumentError, match=match):
        Krea2Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, progress=False)
    assert snapshot(folder) == before


@pytest.mark.parametrize("change, match", [
    (dict(max_shift=float("nan")), r"scheduler_config\.json: max_shift must be a finite number .* got nan"),
    (dict(max_shift=1e6), r"scheduler_config\.json: max_shift must be a finite number in \[-20\.0, 20\.0\]"),
    (dict(base_image_seq_len=6400, max_image_seq_len=6400), r"base_image_seq_len and max_image_seq_len are both"),
])
def test_scheduler_shift_settings_are_bounded(tmp_path, change, match):
    folder = copy_of(pipeline_folder(), tmp_path / "pipe")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    with pytest.raises(ArgumentError, match=match):
        Krea2Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, progress=False)


@pytest.mark.parametrize("kwargs, match", [(dict(vram_gb=float("inf")), r"vram_gb must be a finite number"),
                                           (dict(vram_gb=8, host_ram_gb=float("nan")), r"host_ram_gb must be a finite")])
def test_memory_budgets_are_finite(kwargs, match):
    from krea2_lite.config import Krea2Config
    from krea2_lite.offload import plan_memory

    with pytest.raises(ArgumentError, match=match):
        plan_memory(Krea2Config.tiny(), None, mode="model", **kwargs)


@pytest.mark.parametrize("loader", ["transformer", "vae", "text_encoder"])
def test_loaders_take_float_dtypes_only(loader):
    from krea2_lite.loading.transformer import load_transformer
    from krea2_lite.loading.text_encoder import load_text_encoder
    from krea2_lite.loading.vae import load_vae_decoder

    load = {"transformer": load_transformer, "vae": load_vae_decoder, "text_encoder": load_text_encoder}[loader]
    with pytest.raises(ArgumentError, match="dtype must be one of torch.float32, torch.bfloat16"):
        load(pipeline_folder() / loader, dtype=torch.int8)


# ---- the checks module itself: every bound, by its named constant ---------------------------------
@pytest.mark.parametrize("call, error, name", [
    (lambda: checks.check_steps(checks.MAX_STEPS + 1), ArgumentError, "steps"),
    (lambda: checks.check_steps(0), ArgumentError, "steps"),
    (lambda: checks.check_steps("8"), ArgumentTypeError, "steps"),
    (lambda: checks.check_guidance(checks.MAX_GUIDANCE * 1.01), ArgumentError, "guidance"),
    (lambda: checks.check_guidance(-0.5), ArgumentError, "guidance"),
    (lambda: checks.check_guidance("3.5"), ArgumentTypeError, "guidance"),
    (lambda: checks.check_num_images(checks.MAX_IMAGES + 1), ArgumentError, "num_images"),
    (lambda: checks.check_num_images(0), ArgumentError, "num_images"),
    (lambda: checks.check_mu(checks.MU_RANGE[1] + 1), ArgumentError, "mu"),
    (lambda: checks.check_mu(checks.MU_RANGE[0] - 1), ArgumentError, "mu"),
    (lambda: checks.check_seed(checks.SEED_LIMIT - 1, 1), ArgumentError, "seed"),
    (lambda: checks.check_seed(-1, 1), ArgumentError, "seed"),
    (lambda: checks.check_side("width", checks.MAX_SIDE + 1), ArgumentError, "width"),
    (lambda: checks.check_side("height", 0), ArgumentError, "height"),
    (lambda: checks.check_side("width", 64.0), ArgumentTypeError, "width"),
    (lambda: checks.check_prompts("prompt", []), ArgumentTypeError, "prompt"),
    (lambda: checks.check_prompts("negative_prompt", ["a", "b"], expected=3), ArgumentError, "negative_prompt"),
    (lambda: checks.check_max_sequence_length(checks.MAX_SEQUENCE_LENGTH + 1, None), ArgumentError,
     "max_sequence_length"),
    (lambda: checks.check_gib("vram_gb", checks.MAX_GIB * 2), ArgumentError, "vram_gb"),
    (lambda: checks.check_gib("host_ram_gb", 0), ArgumentError, "host_ram_gb"),
    (lambda: checks.check_offload("disk"), ArgumentError, "offload"),
    (lambda: checks.check_variant("fast"), ArgumentError, "variant"),
    (lambda: checks.check_variant(None, optional=False), ArgumentError, "variant"),
    (lambda: checks.check_plan_request("auto", 8, None, 0, None, False), ArgumentError, "prefetch"),
    (lambda: checks.check_plan_request("auto", 8, None, 1.5, None, False), ArgumentTypeError, "prefetch"),
    (lambda: checks.check_plan_request("disk", 8, None, 1, None, False), ArgumentError, "mode"),
    (lambda: checks.check_plan_request("auto", None, None, 1, None, False), ArgumentError, "vram_gb"),
    (lambda: checks.check_plan_request("auto", 8, None, 1, "gpu", False), ArgumentError, "text_encoder_place"),
    (lambda: checks.check_plan_request("auto", 8, None, 1, "reload", False), ArgumentError, "text_encoder_place"),
    (lambda: checks.folder_defaults({"width": checks.SIZE_MULTIPLE - 1}, "m"), ArgumentError, "krea2_lite.width"),
    (lambda: checks.folder_defaults({"guidance": checks.MAX_GUIDANCE + 1}, "m"), ArgumentError,
     "krea2_lite.guidance"),
])
def test_each_bound_is_a_typed_error_naming_the_argument(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error  # not a plain ValueError / TypeError
    assert name in str(info.value).split(" must ")[0] or str(info.value).startswith(name), str(info.value)


def test_bounds_are_inclusive_and_sizes_round_up():
    assert checks.check_steps(checks.MAX_STEPS) == checks.MAX_STEPS
    assert checks.check_guidance(checks.MAX_GUIDANCE) == checks.MAX_GUIDANCE
    assert checks.check_num_images(checks.MAX_IMAGES) == checks.MAX_IMAGES
    assert checks.check_seed(checks.SEED_LIMIT - 1 - 3, 3) == checks.SEED_LIMIT - 4
    assert checks.check_side("width", checks.MAX_SIDE) == checks.MAX_SIDE
    with pytest.warns(UserWarning, match=f"width=17 is not a multiple of {checks.SIZE_MULTIPLE}; using 32"):
        assert checks.rounded_side("width", 17) == 2 * checks.SIZE_MULTIPLE
    assert checks.check_plan_request("none", None, 4.0, 2, "reload", True) == (None, 4.0)


def test_checks_sits_low_in_the_package():
    """The pipeline, the planner, the loaders and the CLI import checks.py, so it imports none of them."""
    import ast

    tree = ast.parse(open(checks.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
                 if alias.name.startswith("krea2_lite")}
    assert imported <= {"errors", "config", "variants"}, imported


# ---- the CLI and the pipeline refuse a setting with the same words ---------------------------------
@pytest.mark.parametrize("flag, value, kwarg", [
    ("--steps", 5000, "steps"), ("--steps", 0, "steps"), ("--cfg", 1e9, "guidance"), ("--cfg", -1.0, "guidance"),
    ("--seed", -1, "seed"), ("--num-images", 65, "num_images"), ("--mu", 50.0, "mu"),
    ("--width", 8192, "width"), ("--height", 0, "height"),
])
def test_cli_and_pipeline_say_the_same(pipe, capsys, tmp_path, flag, value, kwarg):
    from krea2_lite.cli.subcommands import main

    assert main(["generate", "a cat", "--model", str(pipeline_folder()), "--quiet", flag, str(value),
                 "--output", str(tmp_path / "x.png")]) == 2
    cli_line = capsys.readouterr().err.strip()
    args = dict(width=32, height=32, steps=1, progress=False)
    args[kwarg] = value
    with pytest.raises(ArgumentError) as info:
        pipe("a cat", **args)
    assert cli_line == f"error: {info.value}"
    assert not (tmp_path / "x.png").exists()


def test_cli_and_pipeline_call_the_same_check(pipe, monkeypatch, capsys, tmp_path):
    from krea2_lite.cli.subcommands import main

    seen = []
    real = checks.check_steps

    def spy(steps):
        seen.append(steps)
        return real(steps)

    monkeypatch.setattr(checks, "check_steps", spy)
    assert main(["generate", "a cat", "--model", str(pipeline_folder()), "--quiet", "--steps", "1001",
                 "--output", str(tmp_path / "x.png")]) == 2
    with pytest.raises(ArgumentError):
        pipe("a cat", width=32, height=32, steps=1002, progress=False)
    assert seen == [1001, 1002]
