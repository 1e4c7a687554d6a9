"""The per-GPU `auto` table (krea2_lite/kernels/tuning.json): lookup, validation, writing, dispatch hook."""

import json
from pathlib import Path

import pytest
import torch

from krea2_lite import kernels
from krea2_lite.kernels import dispatch, tuning
from krea2_lite.kernels.tuning import TuningTableError

H200 = {"capability": [9, 0], "qmatmul": {"int8": [[0, "triton"], [2048, "torch"]]},
        "w8a8": {"int8": [[0, "torch"], [8192, "dequant"]]}, "measured": {"by": "test"}}


def table(**gpus):
    return {"format": tuning.FORMAT, "version": tuning.VERSION, "gpus": gpus}


def test_committed_table_is_valid_and_packaged():
    parsed = tuning.validate(tuning.read_table(tuning.TABLE_PATH), str(tuning.TABLE_PATH))
    assert isinstance(parsed, dict)
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"krea2_lite.kernels" = ["tuning.json"]' in text


def test_unknown_gpu_keeps_the_defaults():
    parsed = tuning.validate(table(**{"NVIDIA H200": H200}), "t")
    assert tuning.lookup(parsed, "NVIDIA GeForce RTX 4090", (8, 9)) == {}
    assert tuning.choose({}, "qmatmul", "int8", 4096) is None
    # Tensors off the GPU never consult the table.
    assert tuning.auto_choice("qmatmul", "int8", torch.zeros(4, 8)) is None


def test_lookup_by_name_then_capability_and_token_steps():
    parsed = tuning.validate(table(**{"NVIDIA H200": H200, "sm_90": {"qmatmul": {"int4": [[0, "triton"]]}}}), "t")
    rules = tuning.lookup(parsed, "NVIDIA H200", (9, 0))
    assert [tuning.choose(rules, "qmatmul", "int8", m) for m in (1, 2047, 2048, 10**6)] == \
        ["triton", "triton", "torch", "torch"]
    assert tuning.choose(rules, "w8a8", "int8", 8191) == "torch"
    assert tuning.choose(rules, "w8a8", "int8", 8192) == "dequant"
    assert tuning.choose(rules, "qmatmul", "fp8", 64) is None  # not measured: default
    h100 = tuning.lookup(parsed, "NVIDIA H100 80GB HBM3", (9, 0))  # same capability, other name
    assert tuning.choose(h100, "qmatmul", "int4", 64) == "triton"


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "something else", "version": 1, "gpus": {}}), "not a krea2_lite kernel tuning table"),
    (json.dumps(table() | {"version": 99}), "table version 99"),
    (json.dumps(table(g={"qmatmul": {"int8": [[0, "cutlass"]]}})), "choice 'cutlass' is not one of"),
    (json.dumps(table(g={"qmatmul": {"int8": [[512, "triton"], [64, "torch"]]}})), "min_tokens must increase"),
    (json.dumps(table(g={"qmatmul": {"int2": [[0, "triton"]]}})), "unknown quant type 'int2'"),
    (json.dumps(table(g={"w8a8": {"int8": [[0]]}})), "each step must be"),
    (json.dumps(table(g={"w8a8": {"int8": []}})), "non-empty list"),
    (json.dumps(table(g=[1])), "must be an object"),
])
def test_malformed_table_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "tuning.json"
    path.write_text(content)
    with pytest.raises(TuningTableError, match=message) as info:
        tuning.read_table(path)
    assert str(path) in str(info.value)


def test_missing_table_named_by_the_environment_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KREA2_LITE_TUNING", str(tmp_path / "absent.json"))
    assert tuning.table_path() == tmp_path / "absent.json"
    with pytest.raises(TuningTableError, match="cannot read"):
        tuning._load(str(tuning.table_path()))


def test_write_entry_merges_atomically(tmp_path):
    path = tmp_path / "tuning.json"
    tuning.write_entry(path, "NVIDIA H200", H200)
    tuning.write_entry(path, "sm_89", {"qmatmul": {"int4": [[0, "triton"]]}})
    written = tuning.read_table(path)
    assert set(written["gpus"]) == {"NVIDIA H200", "sm_89"} and written["gpus"]["NVIDIA H200"] == H200
    assert [p.name for p in tmp_path.iterdir()] == ["tuning.json"]  # no temporary file left
    with pytest.raises(TuningTableError, match="choice"):
        tuning.write_entry(path, "bad", {"w8a8": {"fp8": [[0, "nope"]]}})
    assert set(tuning.read_table(path)["gpus"]) == {"NVIDIA H200", "sm_89"}  # unchanged by the refused write


def test_dispatch_asks_the_table_under_auto(monkeypatch):
    """The hook is wired: `auto` consults auto_choice with the kernel, type and input (CPU: it answers None)."""
    asked = []
    monkeypatch.setattr(dispatch, "auto_choice", lambda *a: asked.append(a[:2]) or None)
    monkeypatch.setenv("KREA2_LITE_KERNELS", "auto")
    x = torch.randn(3, 16)
    qdata = torch.randint(-127, 127, (8, 16), dtype=torch.int8)
    scale = torch.rand(8, 1) / 100
    kernels.qmatmul(x, qdata, scale, None, "int8", None, 8, 16)
    kernels.w8a8_linear(x, qdata, scale, None, "int8")
    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    kernels.qmatmul(x, qdata, scale, None, "int8", None, 8, 16)
    assert asked == [("qmatmul", "int8"), ("w8a8", "int8")]


@pytest.mark.gpu
def test_a_table_naming_triton_makes_auto_run_the_kernel(cuda_device, tmp_path, monkeypatch):
    """Not run on the CPU machines this was written on: skips without CUDA."""
    from krea2_lite.kernels.qmatmul_triton import qmatmul_triton
    from krea2_lite.quantize.qlinear import quantize_weight_tensors

    name = torch.cuda.get_device_name(cuda_device)
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(table(**{name: {"qmatmul": {"int8": [[0, "triton"], [4096, "torch"]]}}})))
    monkeypatch.setenv("KREA2_LITE_TUNING", str(path))
    monkeypatch.setenv("KREA2_LITE_KERNELS", "auto")
    w = torch.randn(256, 512, device=cuda_device) * 0.02
    qdata, scale, _ = quantize_weight_tensors(w, "int8", None, torch.bfloat16)
    x = torch.randn(64, 512, device=cuda_device, dtype=torch.bfloat16)
    assert tuning.auto_choice("qmatmul", "int8", x) == "triton"
    args = (qdata, scale, None, "int8", None, 256, 512)
    assert torch.equal(kernels.qmatmul(x, *args), qmatmul_triton(x, *args))
    big = torch.randn(4096, 512, device=cuda_device, dtype=torch.bfloat16)
    assert tuning.auto_choice("qmatmul", "int8", big) == "torch"
