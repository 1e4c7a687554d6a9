"""Quantized Qwen3-VL text path: on-the-fly quantizing loads, in-place quantization, save → reload.

A tiny random Qwen3-VL (36 text layers, hidden 32, MLP 64) saved in the hub layout (untied LM head,
vision tower) is the source. int4 uses per-row groups here: the rows (32 / 64 inputs) are shorter than
the default group of 128, so ``QuantSpec.group_for`` gives one group per row.
"""

from __future__ import annotations

import json
import warnings
import weakref

import pytest
import torch
from safetensors import safe_open as real_safe_open

import krea2_lite.files.safetensors_headers as files_mod  # where every safetensors file is opened
import krea2_lite.quantize.text_encoder as qte
from factories import tiny_qwen3vl_config
from krea2_lite.loading.text_encoder import load_text_encoder
from krea2_lite.quantize.qlinear import STORAGE_DTYPES, QuantizedLinear
from krea2_lite.quantize.recipe import QuantSpec
from krea2_lite.loading.text_encoder_folder import save_text_encoder
from krea2_lite.quantize.text_encoder import quantize_text_encoder_

pytest.importorskip("optimum.quanto")

PROMPTS = ["a red fox sitting in the snow", "", "a cat", "two dogs playing with a yellow ball in the green park"]
MAX_LEN = 16
DTYPES = ["int8", "fp8", "int4"]
# Relative error of the 12 stacked taps against the fp32 encoder, ||q − f|| / ||f|| over the whole output.
# Measured on this model (35 random decoder layers, errors compound through the residual stream):
# int8 0.0259, fp8 0.0641, int4 0.3338 (per-row groups of 32 / 64 inputs; bf16 alone: 0.0132).
# Bounds are ~20% above.
REL_ERROR_BOUND = {"int8": 0.032, "fp8": 0.077, "int4": 0.40}
PER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPECTED_MODULES = [f"layers.{i}.{name}" for i in range(35) for name in PER_LAYER]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A hub-layout folder: model.language_model.* plus model.visual.*, lm_head, the norm and layer 35."""
    from factories import qwen3vl_hub_folder

    return qwen3vl_hub_folder(tmp_path_factory.mktemp("qwen3vl_hub"))


@pytest.fixture(scope="module")
def reference(source):
    encoder = load_text_encoder(source, dtype=torch.float32)
    return encoder, _encode(encoder)


@pytest.fixture(scope="module")
def quantized(source):
    """{dtype: (encoder quantized while streaming, its encode output)}, loaded once per dtype."""
    cache = {}

    def get(dtype):
        if dtype not in cache:
            encoder = load_text_encoder(source, dtype=torch.float32, quant=dtype)
            cache[dtype] = encoder, _encode(encoder)
        return cache[dtype]

    return get


def _encode(encoder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encoder.encode(PROMPTS, max_sequence_length=MAX_LEN, **kw)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------- on-the-fly quantization
@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_quantization_modules_and_error(reference, quantized, dtype):
    encoder, (hidden, mask) = quantized(dtype)
    _, (ref_hidden, ref_mask) = reference
    model = encoder.text_model

    linears = {name: m for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, torch.nn.Linear))}
    assert sorted(linears) == sorted(EXPECTED_MODULES) and encoder.quantized_modules == EXPECTED_MODULES
    for name, module in linears.items():
        assert isinstance(module, QuantizedLinear) and module.dtype == dtype, name
        assert module.qdata.dtype == STORAGE_DTYPES[dtype] and module.scale.dtype == torch.float32
        assert module.group == (module.in_features if dtype == "int4" else None)
    # The embedding table and the norms stay in the model dtype.
    assert model.embed_tokens.weight.dtype == torch.float32
    assert not any(t.is_meta for t in (*encoder.parameters(), *encoder.buffers()))

    rel = _rel(hidden, ref_hidden)
    print(f"\n{dtype}: relative error {rel:.4f}, max-abs / max {_max_rel(hidden, ref_hidden):.4f}")
    assert torch.equal(mask, ref_mask)
    assert 1e-4 < rel <= REL_ERROR_BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_quantization_matches_streamed(source, quantized, dtype):
    encoder = load_text_encoder(source, dtype=torch.float32)
    names = quantize_text_encoder_(encoder, dtype)
    assert names == EXPECTED_MODULES
    assert torch.equal(_encode(encoder)[0], quantized(dtype)[1][0])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_text_encoder_(encoder, dtype)


class _SpyHandle:
    """Records the keys read and keeps a weak reference to every float linear weight handed out."""

    def __init__(self, handle, log, alive):
        self._handle, self._log, self._alive = handle, log, alive

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, key):
        return self._handle.get_slice(key)  # the tests only call get_shape(), read from the header

    def get_tensor(self, key):
        self._log.append(key)
        tensor = self._handle.get_tensor(key)
        if key.endswith("_proj.weight"):
            self._alive.append(weakref.ref(tensor))
        return tensor


def test_streaming_reads_each_weight_once_and_holds_one_float_linear(source, monkeypatch):
    quant_reads, float_reads, alive, live_at_quantize = [], [], [], []
    monkeypatch.setattr(files_mod, "safe_open", lambda *a, **k: _SpyHandle(real_safe_open(*a, **k), quant_reads, alive))
    quantize = qte.quantize_into_

    def counting(module, weight):
        live_at_quantize.append(sum(ref() is not None for ref in alive))
        quantize(module, weight)

    monkeypatch.setattr(qte, "quantize_into_", counting)
    load_text_encoder(source, dtype=torch.float32, quant="int8")

    monkeypatch.setattr(files_mod, "safe_open", lambda *a, **k: _SpyHandle(real_safe_open(*a, **k), float_reads, []))
    load_text_encoder(source, dtype=torch.float32)
    # The same tensors as a float load, each read once.
    assert sorted(quant_reads) == sorted(float_reads) and len(set(quant_reads)) == len(quant_reads)
    assert len(live_at_quantize) == len(EXPECTED_MODULES)
    assert max(live_at_quantize) == 1  # only the weight being quantized: the float model never exists whole


# ---------------------------------------------------------------------- save → reload
@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    cache = {}

    def get(dtype):
        if dtype not in cache:
            folder = tmp_path_factory.mktemp(f"te_{dtype}")
            save_text_encoder(quantized(dtype)[0], folder)
            cache[dtype] = folder
        return cache[dtype]

    return get


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_reload_is_bit_identical(quantized, saved, dtype, monkeypatch):
    folder = saved(dtype)
    read = []
    monkeypatch.setattr(files_mod, "safe_open", lambda *a, **k: _SpyHandle(real_safe_open(*a, **k), read, []))
    reloaded = load_text_encoder(folder, dtype=torch.float32)
    monkeypatch.undo()
    hidden, mask = _encode(reloaded)
    expected_hidden, expected_mask = quantized(dtype)[1]
    assert torch.equal(hidden, expected_hidden) and torch.equal(mask, expected_mask)
    assert reloaded.quant_spec == quantized(dtype)[0].quant_spec
    assert all(isinstance(reloaded.text_model.get_submodule(n), QuantizedLinear) for n in EXPECTED_MODULES)
    # Only quanto's weight tensors are read for the quantized linears (never a float weight or the
    # unused activation scales).
    assert not any(k.endswith("_proj.weight") or k.endswith("input_scale") for k in read)
    assert sum(k.endswith("weight._scale") for k in read) == len(EXPECTED_MODULES)

    # A saved folder loads with fewer taps too (the later layers are simply not read) ...
    few = load_text_encoder(folder, dtype=torch.float32, select_layers=(2, 5))
    assert len(few.quantized_modules) == 5 * len(PER_LAYER)
    assert torch.equal(_encode(few)[0], expected_hidden[:, :, :2])  # taps 2 and 5: the first two of the default 12
    # ... and quantized as saved: the same spec is accepted, another refused.
    load_text_encoder(folder, dtype=torch.float32, select_layers=(2,), quant=dtype)
    with pytest.raises(ValueError, match="already quantized"):
        load_text_encoder(folder, dtype=torch.float32, quant="int4" if dtype != "int4" else "int8")


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_folder_contents(source, quantized, saved, dtype):
    folder = saved(dtype)
    with real_safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        qdata_key = "weight._data._data" if dtype == "int4" else "weight._data"
        assert f.get_tensor(f"model.language_model.layers.0.mlp.up_proj.{qdata_key}").dtype == STORAGE_DTYPES[dtype]
    assert all(k.startswith("model.language_model.") for k in keys)
    assert not any("visual" in k or "lm_head" in k or k == "model.language_model.norm.weight"
                   or ".layers.35." in k for k in keys)
    assert not any(k.endswith("_proj.weight") for k in keys)  # no float copy of a quantized linear
    per_layer_float = ("input_layernorm.weight", "post_attention_layernorm.weight",
                       "self_attn.q_norm.weight", "self_attn.k_norm.weight")
    expected = {"model.language_model.embed_tokens.weight"}
    expected |= {f"model.language_model.layers.{i}.{n}" for i in range(35) for n in per_layer_float}
    encoder = quantized(dtype)[0]
    for name in EXPECTED_MODULES:
        expected |= set(encoder.text_model.get_submodule(name).quanto_state(f"model.language_model.{name}."))
    assert keys == expected

    quanto_map = json.loads((folder / "quantization_map.json").read_text())
    qtype = {"int8": "qint8", "fp8": "qfloat8_e4m3fn", "int4": "qint4"}[dtype]
    assert quanto_map == {f"model.language_model.{n}": {"weights": qtype, "activations": "none"}
                          for n in EXPECTED_MODULES}
    info = json.loads((folder / "krea2_lite_text_encoder.json").read_text())
    assert info["modules"] == EXPECTED_MODULES and QuantSpec.from_dict(info["quantization"]).dtype == dtype
    # config.json is the source's, untouched; the tokenizer travels with the weights.
    assert json.loads((folder / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("dtype, bound", [("int8", 0.54), ("fp8", 0.54), ("int4", 0.32)])
def test_on_disk_size_vs_bf16_and_bf16_round_trip(source, tmp_path, dtype, bound):
    """bf16 encoder: quantized linears on disk vs the same linears in bf16. Per linear, int8 / fp8 store
    1 byte a weight plus one bf16 scale a row; int4 half a byte plus a bf16 scale and shift a group (a
    row of 32 or 64 here, 128 in the real model)."""
    encoder = load_text_encoder(source, dtype=torch.bfloat16, quant=dtype)
    save_text_encoder(encoder, tmp_path)
    quantized_bytes = bf16_bytes = 0
    with real_safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name in EXPECTED_MODULES:
            module = encoder.text_model.get_submodule(name)
            bf16_bytes += 2 * module.in_features * module.out_features
            for key in module.quanto_state(f"model.language_model.{name}."):
                tensor = f.get_tensor(key)
                quantized_bytes += tensor.numel() * tensor.element_size()
    ratio = quantized_bytes / bf16_bytes
    print(f"\n{dtype}: saved linears / bf16 = {ratio:.3f}")
    assert 0.25 <= ratio <= bound

    reloaded = load_text_encoder(tmp_path)  # default dtype bf16, like the saved encoder
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(_encode(reloaded)[0], _encode(encoder)[0])


def test_float_save_round_trip(reference, tmp_path):
    encoder, (hidden, _) = reference
    save_text_encoder(encoder, tmp_path)
    assert not (tmp_path / "quantization_map.json").exists()
    reloaded = load_text_encoder(tmp_path, dtype=torch.float32)
    assert reloaded.quant_spec is None and torch.equal(_encode(reloaded)[0], hidden)
    # A float folder written by save_text_encoder can still be quantized while loading.
    assert load_text_encoder(tmp_path, dtype=torch.float32, select_layers=(2,), quant="int8").quant_spec.dtype == "int8"


def test_spec_retargeting_and_exclude(source):
    spec = QuantSpec("int8", exclude=("*.mlp.down_proj",))
    encoder = load_text_encoder(source, dtype=torch.float32, select_layers=(2,), quant=spec)
    assert encoder.quant_spec.include == qte.TEXT_INCLUDE  # the transformer's default include, re-targeted
    assert encoder.quantized_modules == [n for n in EXPECTED_MODULES[:14] if "down_proj" not in n]
    assert type(encoder.text_model.layers[0].mlp.down_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="quant dtype"):
        load_text_encoder(source, quant="int3")


def test_int4_layers_the_group_does_not_divide_stay_float(caplog):
    """hidden 96 with groups of 64: q/k/v/gate/up (96 inputs) stay float and are logged; o_proj (64 inputs,
    one group a row) and down_proj (128 inputs, two groups) are quantized."""
    from krea2_lite.model.text_encoder import Krea2TextEncoder

    config = tiny_qwen3vl_config().text_config
    config.hidden_size, config.intermediate_size = 96, 128
    torch.manual_seed(0)
    encoder = Krea2TextEncoder(config, select_layers=(1,))
    with caplog.at_level("INFO", logger="krea2_lite"):
        names = quantize_text_encoder_(encoder, QuantSpec("int4", group_size=64))
    assert names == ["layers.0.self_attn.o_proj", "layers.0.mlp.down_proj"]
    assert encoder.text_model.layers[0].mlp.down_proj.group == 64
    assert type(encoder.text_model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert "in_features=96 is not a multiple of group_size=64" in caplog.text
