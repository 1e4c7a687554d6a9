"""Reliability battery, argument bounds: everything a user passes to Krea2Pipeline.__call__ /
from_pretrained is bounded (krea2_lite/arguments.py) and refused before any work, with a message
naming the argument and its allowed range."""

import json

import pytest
import torch

from krea2_lite import arguments
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
        arguments.check_device("cuda:3")


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
