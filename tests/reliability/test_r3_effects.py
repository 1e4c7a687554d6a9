"""Issue 29, classes 4 and 5: no option silently without effect; a PNG's settings cannot be turned
against the user (forged A1111 fields), and every quant name the library prints is accepted."""

import os

import pytest

from krea2_lite import QuantSpec
from krea2_lite.cli.generate_settings import quant_argument
from krea2_lite.errors import ArgumentError
from krea2_lite.metadata import format_parameters
from krea2_lite.quantize.skeleton import build_quantized_skeleton
from krea2_lite.config import Krea2Config
from r3_helpers import built_pipeline, quantize_refused, source_transformer  # noqa: F401


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
