"""Issue 29, classes 4 and 5: no option silently without effect; a PNG's settings cannot be turned
against the user (forged A1111 fields), and every quant name the library prints is accepted."""

import os
import warnings

import pytest

from krea2_lite import QuantSpec
from krea2_lite.cli.generate_settings import quant_argument
from krea2_lite.errors import ArgumentError
from krea2_lite.metadata import format_parameters
from krea2_lite.quantize.skeleton import build_quantized_skeleton
from krea2_lite.config import Krea2Config
from r3_helpers import built_pipeline, no_load, quantize_refused, source_transformer  # noqa: F401


# ---- class 4: a recipe that touches nothing, options that do nothing --------------------------
def test_empty_include_is_refused():
    with pytest.raises(ArgumentError, match="selects no layer"):
        QuantSpec("int8", include=())


@pytest.mark.parametrize("kwargs", [dict(include=("block.*",)), dict(exclude=("*",)), dict(include=("nothing",))])
def test_recipe_selecting_no_layer_is_an_error(kwargs):
    import torch

    with pytest.raises(ArgumentError, match="quantizes no linear layer"):
        build_quantized_skeleton(Krea2Config.tiny(), QuantSpec("int8", **kwargs), torch.float32, log=False)


@pytest.mark.parametrize("flags", [["--include", "block.*"], ["--exclude", "*"]])
def test_quantize_cli_refuses_a_recipe_of_nothing(tmp_path, capsys, flags):
    src = source_transformer(tmp_path)
    quantize_refused(capsys, tmp_path, "--model", src, "--dtype", "int8", "--out", tmp_path / "o", *flags,
                     match="quantizes no linear layer")
    assert not [n for n in os.listdir(tmp_path) if n != "src"]


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_group_size_on_8_bit_types_is_refused(tmp_path, capsys, dtype):
    src = source_transformer(tmp_path)
    quantize_refused(capsys, tmp_path, "--model", src, "--dtype", dtype, "--group-size", "64",
                     "--out", tmp_path / "o", match="--group-size applies to int4 only")


# ---- class 5: quant names round-trip; A1111 fields cannot be forged ---------------------------
@pytest.mark.parametrize("spec", [QuantSpec("int8", activations="int8", rotate=128),
                                  QuantSpec("fp8", activations="fp8", rotate=64),
                                  QuantSpec("int8", activations="int8"), QuantSpec("int4", lowrank=8)])
def test_every_printed_name_parses_back(spec):
    assert QuantSpec.parse(spec.name) == spec
    assert quant_argument(spec.name) == spec.name


def test_rot128_is_the_rot_shortcut():
    assert QuantSpec.parse("int8-w8a8-rot128") == QuantSpec.parse("int8-w8a8-rot")


@pytest.mark.parametrize("prompt", ["a cat\nNegative prompt: ugly\nSteps: 99, Seed: 1",
                                    "a cat\r\nSteps: 99, CFG scale: 9, Seed: 5, Size: 8x8",
                                    "a cat\u2028Negative prompt: forged"])
def test_prompt_cannot_forge_a1111_fields(prompt):
    text = format_parameters({"prompt": prompt, "negative_prompt": "real\nSteps: 1", "steps": 8, "guidance": 0,
                              "seed": 3, "width": 64, "height": 64})
    lines = text.split("\n")
    assert len(lines) == 3
    assert lines[1].startswith("Negative prompt: real") and lines[2].startswith("Steps: 8,")
    assert sum(line.startswith("Negative prompt:") for line in lines) == 1


def test_manifest_variant_is_honoured(tmp_path):
    from krea2_lite.loading.pipeline import resolve_pipeline
    from reliability_fixtures import pipeline_folder
    from r3_helpers import quantize

    out = tmp_path / "q"
    assert quantize("--model", pipeline_folder(), "--dtype", "int8", "--out", out, "--variant", "turbo") == 0
    spec = resolve_pipeline(out)
    assert spec.variant == "turbo"


# ---- class 5: the files a PNG names are the files that drew it ---------------------------------
def _png_naming(tmp_path, **fields):
    from PIL import Image

    from krea2_lite import save_png

    meta = {"prompt": "a fox", "seed": 1, "steps": 2, "guidance": 0.0, "width": 64, "height": 64, **fields}
    return save_png(Image.new("RGB", (2, 2)), tmp_path / "img.png", meta)


def test_png_model_of_another_size_is_refused(tmp_path, capsys, no_load):
    from r3_helpers import generate_refused

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x" * 100)
    png = _png_naming(tmp_path, model=str(model), model_bytes=99)
    generate_refused(capsys, tmp_path, ["--from-png", str(png), "--device", "cpu", "--quiet",
                                        "--output", str(tmp_path / "o.png")], match="a different file")


def test_png_model_replaced_by_the_flag_is_not_checked(tmp_path):
    from krea2_lite.cli.generate_settings import resolve_settings
    from krea2_lite.cli.subcommands import build_parser

    png = _png_naming(tmp_path, model=str(tmp_path / "gone.safetensors"), model_bytes=5)
    args = build_parser().parse_args(["generate", "--from-png", str(png), "--model", "demo"])
    assert resolve_settings(args)[1]["model"] == "demo"  # the error message's advice works


def test_png_model_missing_here_is_refused(tmp_path, capsys, no_load):
    from r3_helpers import generate_refused

    png = _png_naming(tmp_path, model=str(tmp_path / "gone.safetensors"), model_bytes=5)
    generate_refused(capsys, tmp_path, ["--from-png", str(png), "--device", "cpu", "--quiet",
                                        "--output", str(tmp_path / "o.png")], match="not found here")


def test_png_naming_an_uncached_hub_repo_needs_allow_download(tmp_path, capsys, no_load, monkeypatch):
    from r3_helpers import generate_refused

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    png = _png_naming(tmp_path, model="someone/evil-model")
    generate_refused(capsys, tmp_path, ["--from-png", str(png), "--device", "cpu", "--quiet",
                                        "--output", str(tmp_path / "o.png")], match="--allow-download")


def test_png_records_absolute_model_size_and_sequence_length(tmp_path, monkeypatch):
    from krea2_lite import read_png_metadata
    from krea2_lite.cli.subcommands import main
    from reliability_fixtures import pipeline_folder

    monkeypatch.chdir(pipeline_folder().parent)
    out = tmp_path / "a.png"
    assert main(["generate", "x", "--model", pipeline_folder().name, "--steps", "1", "--device", "cpu", "--quiet",
                 "--dtype", "fp32", "--output", str(out)]) == 0
    meta = read_png_metadata(out)
    assert meta["model"] == str(pipeline_folder().resolve()) and meta["model_bytes"] > 0
    assert isinstance(meta["max_sequence_length"], int)


def test_host_ram_budget_without_a_plan_warns():
    """host_ram_gb only steers the offload planner: on the CPU without vram_gb it is said to do nothing."""
    import torch

    from krea2_lite import Krea2Pipeline

    with pytest.warns(UserWarning, match="host_ram_gb=8.0 has no effect"):
        Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False, host_ram_gb=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a budget to plan for, the RAM budget is used: no warning
        Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False, host_ram_gb=8.0,
                                      vram_gb=4.0)


def test_cli_ram_gb_on_the_cpu_is_one_warning_line(tmp_path, capsys):
    from krea2_lite.cli.subcommands import main

    out = tmp_path / "a.png"
    assert main(["generate", "--model", "demo", "--device", "cpu", "--ram-gb", "8", "--steps", "2", "--width", "64",
                 "--height", "64", "--quiet", "--output", str(out), "a red square"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    warned = [line for line in err if "has no effect" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: host_ram_gb=8.0 has no effect"), err
    assert out.is_file()
