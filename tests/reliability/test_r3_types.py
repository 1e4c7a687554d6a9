"""Issue 29, class 3: everything a file or a caller hands in is type-checked where it enters."""

import json
import re

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from krea2_lite import QuantSpec, read_png_metadata, save_png
from krea2_lite import checks
from krea2_lite.errors import (ArgumentError, ArgumentTypeError, CorruptCheckpointError, MetadataError)
from krea2_lite.loading.transformer import load_transformer
from krea2_lite.pipeline import Krea2Pipeline
from reliability_fixtures import copy_of, pipeline_folder, snapshot
from r3_helpers import (FAST, built_pipeline, generate_refused, no_load, quantize, quantize_refused,  # noqa: F401
                        source_transformer)

def hostile_png(path, meta):
    """A PNG carrying `meta` as written by someone else (save_png itself refuses such metadata)."""
    info = PngInfo()
    info.add_itxt("krea2_lite", json.dumps(meta))
    Image.new("RGB", (2, 2)).save(path, pnginfo=info)
    return path


GOOD = {"prompt": "a fox", "seed": 1, "steps": 2, "guidance": 0.0, "width": 64, "height": 64, "model": "demo"}


# ---- QuantSpec: types checked, strings never split ---------------------------------------------
def test_string_include_is_one_pattern():
    assert QuantSpec("int8", include="blocks.*").include == ("blocks.*",)
    assert QuantSpec("int8", exclude="blocks.0.*").exclude == ("blocks.0.*",)


@pytest.mark.parametrize("kwargs", [dict(include=[1]), dict(group_size=1e400), dict(group_size="128"),
                                    dict(group_size=True), dict(rotate="x"), dict(exclude=5), dict(lowrank=2.5)])
def test_bad_field_types_are_argument_type_errors(kwargs):
    with pytest.raises(ArgumentTypeError):
        QuantSpec("int8" if "lowrank" not in kwargs else "int4", **kwargs)


def test_dtype_must_be_a_string():
    with pytest.raises(ArgumentTypeError, match="dtype"):
        QuantSpec(8)


@pytest.mark.parametrize("data", [{"dtype": "int4", "group_size": 1e400}, {"dtype": "int8", "include": [1]},
                                  {"dtype": "int8", "rotate": 1e400}, {"group_size": 128}, ["int8"]])
def test_from_dict_never_converts(data):
    with pytest.raises(ArgumentError):
        QuantSpec.from_dict(data)


def test_parse_of_a_number_is_typed():
    with pytest.raises(ArgumentTypeError, match="quant"):
        QuantSpec.parse(8)


# ---- PNG metadata ------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("model", 5), ("model", ["a"]), ("model", {"path": "x"}), ("prompt", 3),
                                        ("steps", "8"), ("seed", True), ("loras", "x"), ("width", 64.5)])
def test_png_fields_of_the_wrong_type_name_the_png(tmp_path, key, value):
    path = hostile_png(tmp_path / "img.png", {**GOOD, key: value})
    with pytest.raises(MetadataError, match=re.escape(str(path)) + f".*'{key}'"):
        read_png_metadata(path)
    with pytest.raises(MetadataError, match=f"'{key}'"):  # and save_png never writes it
        save_png(Image.new("RGB", (2, 2)), tmp_path / "again.png", {**GOOD, key: value})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


@pytest.mark.parametrize("quant", [{"dtype": "int4", "group_size": 1e400}, {"dtype": "int8", "include": [1]},
                                   {"dtype": "int8", "include": "blocks.*", "group_size": -1}])
def test_png_quant_dict_is_one_line_before_loading(tmp_path, capsys, no_load, quant):
    path = hostile_png(tmp_path / "img.png", {**GOOD, "quant": quant})
    generate_refused(capsys, tmp_path, ["--from-png", str(path), "--device", "cpu", "--quiet",
                                        "--output", str(tmp_path / "o.png")], match="img.png")


# ---- the quantized folder's manifest -----------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    src = copy_of(pipeline_folder() / "transformer", root / "src")
    assert quantize("--model", src, "--dtype", "int8", "--out", root / "out") == 0
    return root / "out"


def _edited(tmp_path, folder, edit):
    out = copy_of(folder, tmp_path / "q")
    manifest = json.loads((out / "krea2_lite.json").read_text())
    edit(manifest)
    (out / "krea2_lite.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("edit", [lambda m: m["quant"].pop("modules"), lambda m: m["quant"].update(modules="blocks.0"),
                                  lambda m: m["quant"].update(modules=["blocks.0"]),
                                  lambda m: m["quant"].update(modules=["blocks.0.attn.wq", "first"][:1] + ["norm"]),
                                  lambda m: m["quant"].update(group_size=1e400),
                                  lambda m: m["quant"].update(include=[1]),
                                  lambda m: m.update(quant="int8")],
                         ids=["modules-missing", "modules-string", "modules-not-linear", "modules-norm",
                              "group-size-inf", "include-number", "quant-string"])
def test_manifest_values_are_corrupt_checkpoint_errors_naming_it(tmp_path, folder, edit):
    out = _edited(tmp_path, folder, edit)
    before = snapshot(out)
    with pytest.raises(CorruptCheckpointError, match=r"krea2_lite\.json"):
        load_transformer(out, dtype=__import__("torch").float32)
    assert snapshot(out) == before


# ---- the command lines and the Python API ------------------------------------------------------
def test_max_shard_size_with_400_digits(tmp_path, capsys):
    src = source_transformer(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit 2: usage, then one error line
        quantize("--model", src, "--dtype", "int8", "--out", tmp_path / "o", "--max-shard-size", "9" * 400)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]
    assert "--max-shard-size" in err and not (tmp_path / "o").exists()


def test_kernels_environment_checked_before_loading(tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.setenv("KREA2_LITE_KERNELS", "garbage")
    generate_refused(capsys, tmp_path, ["x", *FAST, "--output", str(tmp_path / "a.png")],
                     match="KREA2_LITE_KERNELS")
    assert not no_load


@pytest.mark.parametrize("prompts, images, side", [(2, 64, 64), (1, 64, 2048), (65, 1, 64)])
def test_whole_call_bounds(prompts, images, side):
    with pytest.raises(ArgumentError):
        checks.check_call_total(prompts, images, side, side)


def test_prompt_count_and_length_bounds():
    with pytest.raises(ArgumentError, match="at most"):
        checks.check_prompts("prompt", ["a"] * (checks.MAX_PROMPTS + 1))
    with pytest.raises(ArgumentError, match="characters"):
        checks.check_prompts("prompt", "x" * (checks.MAX_PROMPT_CHARS + 1))


def test_cli_job_pixels_bounded_before_loading(tmp_path, capsys, no_load):
    generate_refused(capsys, tmp_path, ["x", *FAST, "--num-images", "64", "--width", "4096", "--height", "4096",
                                        "--output", str(tmp_path / "{index}.png")], match="pixels")


@pytest.mark.parametrize("kwargs, error", [(dict(offload=5), ArgumentError), (dict(variant="fast"), ArgumentError),
                                           (dict(quant=8), ArgumentTypeError),
                                           (dict(quant="int9"), ArgumentError)])
def test_from_pretrained_arguments(kwargs, error):
    with pytest.raises(error):
        Krea2Pipeline.from_pretrained("demo", device="cpu", **kwargs)


# ---- stored scales: NaN named, all-zero / negated caught at load ------------------------------
@pytest.mark.parametrize("damage, error", [("nan", "NonFiniteError"), ("zero", "CorruptCheckpointError"),
                                           ("negate", "CorruptCheckpointError")])
def test_damaged_stored_scales_are_caught_at_load(tmp_path, folder, damage, error):
    import torch
    from safetensors.torch import load_file, save_file

    from krea2_lite import errors

    out = copy_of(folder, tmp_path / "q")
    weights = out / "transformer" / "model.safetensors"
    state = load_file(str(weights))
    key = sorted(k for k in state if k.endswith("weight._scale"))[0]
    scale = state[key].clone()
    state[key] = {"nan": scale.masked_fill(torch.arange(scale.numel()).view_as(scale) == 0, float("nan")),
                  "zero": torch.zeros_like(scale), "negate": -scale}[damage]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(getattr(errors, error), match=re.escape(key.rsplit(".", 0)[0])):
        load_transformer(out, dtype=torch.float32)


@pytest.mark.parametrize("kwargs, error", [(dict(path_or_hub_id=b"demo"), ArgumentTypeError),
                                           (dict(transformer=b"x"), ArgumentTypeError),
                                           (dict(prefetch="2"), ArgumentTypeError), (dict(prefetch=0), ArgumentError),
                                           (dict(vae=5), ArgumentTypeError)])
def test_from_pretrained_paths_and_prefetch(kwargs, error):
    kwargs = {"path_or_hub_id": "demo", **kwargs}
    with pytest.raises(error, match=next(iter(k for k in kwargs if k != "path_or_hub_id"), "path_or_hub_id")):
        Krea2Pipeline.from_pretrained(device="cpu", **kwargs)
