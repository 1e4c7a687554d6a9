"""ComfyUI quantized safetensors load as stored (fp8 as this library's fp8 layers, block-scaled int8
as ScaledLinear), equal to a model built from the dequantized tensors; bad files are typed errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_files import PREFIX, mixed, scaled_fp8
from factories import random_inputs
from gguf_files import random_model_state
from krea2_lite import Krea2Config, load_transformer
from krea2_lite.errors import CorruptCheckpointError, UnsupportedFormatError
from krea2_lite.model import Krea2Transformer
from krea2_lite.quantize import QuantizedLinear
from krea2_lite.quantize.scaled_linear import ScaledLinear

CFG = Krea2Config.tiny(features=256, tdim=256, txtdim=256, layers=2)


@pytest.fixture(scope="module")
def state():
    return random_model_state(CFG, seed=4)


def check_forward(model, reference):
    with torch.device("meta"):
        ref = Krea2Transformer(CFG)
    ref.load_state_dict(reference, assign=True)
    inputs = random_inputs(CFG, 1, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), ref.eval()(*inputs), rtol=1e-5, atol=1e-5)


def test_legacy_scaled_fp8(tmp_path, state, single_thread):
    reference, _ = scaled_fp8(tmp_path / "fp8.safetensors", state)
    model = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    layer = model.blocks[0].attn.wq
    assert isinstance(layer, QuantizedLinear) and layer.dtype == "fp8" and layer.qdata.dtype == torch.float8_e4m3fn
    check_forward(model, reference)


def test_legacy_scaled_fp8_e5m2(tmp_path, state):
    reference, _ = scaled_fp8(tmp_path / "e5m2.safetensors", state, torch.float8_e5m2)
    model = load_transformer(tmp_path / "e5m2.safetensors", dtype=torch.float32)
    assert isinstance(model.blocks[0].mlp.up, ScaledLinear)
    check_forward(model, reference)


@pytest.mark.parametrize("per_layer", [False, True])
def test_mixed_precision_fp8_and_int8_blockwise(tmp_path, state, per_layer):
    formats = {"blocks.0.attn.wq": ("float8_e4m3fn", None), "blocks.0.mlp.up": ("int8_blockwise", (128, 128)),
               "blocks.1.mlp.down": ("int8_blockwise", (1, 128)), "blocks.1.attn.wo": ("int8_blockwise", (1, 256))}
    reference = mixed(tmp_path / "mixed.safetensors", state, formats, per_layer=per_layer)
    model = load_transformer(tmp_path / "mixed.safetensors", dtype=torch.float32)
    assert model.blocks[0].attn.wq.dtype == "fp8"
    assert isinstance(model.blocks[0].mlp.up, ScaledLinear) and model.blocks[0].mlp.up.block == (128, 128)
    assert isinstance(model.blocks[1].mlp.down, ScaledLinear)
    assert model.blocks[1].attn.wo.dtype == "int8"  # per-row int8 is this library's int8 linear
    assert type(model.blocks[0].attn.wk).__name__ == "Linear"
    check_forward(model, reference)


def test_memory_is_the_file(tmp_path, state):
    scaled_fp8(tmp_path / "fp8.safetensors", state)
    model = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    size = (tmp_path / "fp8.safetensors").stat().st_size
    assert 0.85 * size < held < 1.1 * size


def rewrite(path, change, metadata=None):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)
    return path


def test_bad_scales_and_metadata(tmp_path, state):
    path = tmp_path / "fp8.safetensors"
    scaled_fp8(path, state)
    key = PREFIX + "blocks.1.attn.wq.scale_weight"
    rewrite(path, lambda t: t.__setitem__(key, torch.tensor(float("nan"))))
    with pytest.raises(CorruptCheckpointError, match=r"fp8\.safetensors.*blocks\.1\.attn\.wq\.scale_weight.*NaN"):
        load_transformer(path)
    formats = {"blocks.0.mlp.up": ("int8_blockwise", (128, 128))}
    mixed(path, state, formats)
    key = PREFIX + "blocks.0.mlp.up.weight_scale"
    meta = {"_quantization_metadata": json.dumps({"layers": {PREFIX + "blocks.0.mlp.up": {
        "format": "int8_blockwise", "group_size": 128}}})}
    rewrite(path, lambda t: t.__setitem__(key, torch.ones(3, 5)), meta)
    with pytest.raises(CorruptCheckpointError, match=r"blocks\.0\.mlp\.up\.weight_scale' has shape \(3, 5\)"):
        load_transformer(path)
    ghost = {"_quantization_metadata": json.dumps({"layers": {"blocks.0.attn.nothere": {"format": "float8_e4m3fn"}}})}
    rewrite(path, lambda t: None, ghost)
    with pytest.raises(CorruptCheckpointError, match=r"'blocks\.0\.attn\.nothere', which has no weight"):
        load_transformer(path)


def test_formats_that_do_not_run_here_are_named(tmp_path, state):
    path = tmp_path / "fp4.safetensors"
    mixed(path, state, {"blocks.0.mlp.up": ("int8_blockwise", (128, 128))})
    meta = {"_quantization_metadata": json.dumps({"layers": {PREFIX + "blocks.0.mlp.up": {"format": "nvfp4"}}})}
    rewrite(path, lambda t: None, meta)
    with pytest.raises(UnsupportedFormatError, match=r"'blocks\.0\.mlp\.up' is nvfp4.*Blackwell.*GGUF"):
        load_transformer(path)
