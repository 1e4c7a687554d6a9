"""Reliability battery, safetensors sets: one tensor in two files, an index's weight_map, header
byte lengths against shape × dtype (on the float and the quantizing path), integer tensors where
floats belong, and dtype= arguments. Each error is a SafetensorsSetError (a CorruptCheckpointError)
or ArgumentError naming the file and tensor; nothing is changed or left behind."""

import json

import pytest
import torch
from safetensors.torch import save_file

from krea2_lite.files.checkpoint import open_checkpoint
from krea2_lite.loading.transformer import load_transformer
from krea2_lite.errors import ArgumentError, SafetensorsSetError
from krea2_lite.loading.text_encoder import load_text_encoder
from krea2_lite.loading.vae import load_vae_decoder
from krea2_lite.pipeline import Krea2Pipeline
from krea2_lite.cli import quantize as quantize_cli
from reliability_fixtures import copy_of, official_file, official_state, pipeline_folder, rewrite_header, snapshot


def _split(state: dict, at: str = "blocks.") -> tuple[dict, dict]:
    a = {k: v for k, v in state.items() if not k.startswith(at)}
    return a, {k: v for k, v in state.items() if k.startswith(at)}


def test_duplicate_tensor_in_two_unindexed_files_is_refused(tmp_path):
    head, blocks = _split(official_state())
    save_file(head, str(tmp_path / "a.safetensors"))
    save_file(dict(blocks, **{"first.weight": head["first.weight"] * 2}), str(tmp_path / "b.safetensors"))
    before = snapshot(tmp_path)
    with pytest.raises(SafetensorsSetError, match=r"'first\.weight' is in both \S*a\.safetensors and \S*b\.safetensors"):
        open_checkpoint(tmp_path)
    assert snapshot(tmp_path) == before


def test_the_index_weight_map_is_obeyed(tmp_path):
    state = official_state()
    head, blocks = _split(state)
    save_file(dict(head, **{"first.weight": torch.full_like(head["first.weight"], 7.0)}),
              str(tmp_path / "a.safetensors"))
    save_file(dict(blocks, **{"first.weight": state["first.weight"]}), str(tmp_path / "b.safetensors"))
    weight_map = {k: "a.safetensors" for k in head} | {k: "b.safetensors" for k in blocks}
    weight_map["first.weight"] = "b.safetensors"  # the index says: the copy in b
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_transformer(tmp_path, dtype=torch.float32)
    assert torch.equal(model.first.weight, state["first.weight"])


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    head, blocks = _split(official_state())
    save_file(head, str(tmp_path / "a.safetensors"))
    save_file(blocks, str(tmp_path / "b.safetensors"))
    weight_map = {k: "a.safetensors" for k in head} | {k: "a.safetensors" for k in blocks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SafetensorsSetError, match=r"index\.json: lists \d+ tensor\(s\) their shard does not hold \(first: \['blocks\.0\."):
        open_checkpoint(tmp_path)


def test_relabelled_dtype_is_caught_by_byte_length(tmp_path):
    path = official_file(tmp_path / "k.safetensors")
    rewrite_header(path, lambda h: h["first.weight"].update(dtype="F16"))  # F32 bytes, F16 label
    before = snapshot(tmp_path)
    with pytest.raises(SafetensorsSetError, match=r"k\.safetensors: tensor 'first\.weight' is F16 .* but its header "
                                                  r"gives it \d+ bytes"):
        load_transformer(path)
    assert snapshot(tmp_path) == before


def test_byte_length_is_checked_on_the_quantize_path(tmp_path, capsys):
    src = official_file(tmp_path / "k.safetensors")
    rewrite_header(src, lambda h: h["blocks.0.attn.wq.weight"].update(shape=[1, 1]))
    out = tmp_path / "q"
    assert quantize_cli.main(["--model", str(src), "--dtype", "int8", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensor 'blocks.0.attn.wq.weight' is F32 [1, 1]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_tensor_where_floats_belong(tmp_path, dtype):
    state = dict(official_state())
    state["blocks.0.mlp.gate.weight"] = torch.ones_like(state["blocks.0.mlp.gate.weight"]).to(dtype)
    path = official_file(tmp_path / "k.safetensors", state)
    with pytest.raises(SafetensorsSetError, match=r"'blocks\.0\.mlp\.gate\.weight' is stored as (I64|BOOL), but the "
                                                  "model expects floating point"):
        load_transformer(path, quant="int8")


def test_comfyui_file_with_a_tensor_under_two_names(tmp_path):
    state = official_state()
    prefixed = {"model.diffusion_model." + k: v for k, v in state.items()}
    prefixed["first.weight"] = state["first.weight"] * 3  # the bare name as well
    path = tmp_path / "comfy.safetensors"
    save_file(prefixed, str(path))
    with pytest.raises(SafetensorsSetError, match=r"'(model\.diffusion_model\.)?first\.weight' and "
                                                  r"'(model\.diffusion_model\.)?first\.weight' are the same tensor"):
        open_checkpoint(path)


def test_text_encoder_stray_file_beside_model_safetensors_is_not_read(tmp_path):
    # A folder with model.safetensors reads that file only (loading.files' preferred file): a stray
    # copy of a tensor beside it can neither win silently nor merge into the model.
    from safetensors.torch import load_file

    folder = copy_of(pipeline_folder() / "text_encoder", tmp_path / "text_encoder")
    copy_of(pipeline_folder() / "tokenizer", tmp_path / "tokenizer")
    key = "language_model.embed_tokens.weight"
    real = load_file(str(folder / "model.safetensors"))[key]
    save_file({key: torch.zeros_like(real)}, str(folder / "extra.safetensors"))
    encoder = load_text_encoder(folder, dtype=torch.float32)
    assert torch.equal(encoder.text_model.embed_tokens.weight, real.float())


def test_text_encoder_duplicate_across_unindexed_files(tmp_path):
    folder = copy_of(pipeline_folder() / "text_encoder", tmp_path / "text_encoder")
    copy_of(pipeline_folder() / "tokenizer", tmp_path / "tokenizer")
    key = "language_model.embed_tokens.weight"
    (folder / "model.safetensors").rename(folder / "part-a.safetensors")  # no preferred file, no index
    save_file({key: torch.zeros(3, 3)}, str(folder / "part-b.safetensors"))
    with pytest.raises(SafetensorsSetError, match=r"'language_model\.embed_tokens\.weight' is in both"):
        load_text_encoder(folder, dtype=torch.float32)


def test_text_encoder_integer_weight(tmp_path):
    folder = copy_of(pipeline_folder() / "text_encoder", tmp_path / "text_encoder")
    copy_of(pipeline_folder() / "tokenizer", tmp_path / "tokenizer")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("layers.0.mlp.up_proj.weight"))
    state[key] = state[key].to(torch.int32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(SafetensorsSetError, match=rf"'{key}' is stored as I32"):
        load_text_encoder(folder, dtype=torch.float32)


def test_vae_integer_weight(tmp_path):
    folder = copy_of(pipeline_folder() / "vae", tmp_path / "vae")
    from safetensors.torch import load_file

    weights = next(folder.glob("*.safetensors"))
    state = load_file(str(weights))
    state["post_quant_conv.bias"] = state["post_quant_conv.bias"].to(torch.int16)
    save_file(state, str(weights))
    with pytest.raises(SafetensorsSetError, match=r"'post_quant_conv\.bias' is torch\.int16; the VAE expects floating"):
        load_vae_decoder(folder)


@pytest.mark.parametrize("dtype, error", [(torch.int8, ArgumentError), ("bf16", TypeError)])
def test_dtype_argument_must_be_a_float_type(dtype, error):
    with pytest.raises(error, match="dtype must be"):
        Krea2Pipeline.from_pretrained(pipeline_folder(), device="cpu", dtype=dtype, progress=False)


@pytest.mark.parametrize("key, shape", [("blocks.0.attn.qknorm.qnorm.scale", (0,)), ("first.weight", ()),
                                        ("first.weight", (5,))])
def test_degenerate_shapes_are_shape_errors(tmp_path, key, shape):
    from krea2_lite.errors import ShapeMismatchError

    state = dict(official_state())
    state[key] = torch.zeros(shape)
    path = official_file(tmp_path / "k.safetensors", state)
    with pytest.raises(ShapeMismatchError, match=r"k\.safetensors: tensor shapes that fit no Krea 2 transformer"):
        load_transformer(path)


def test_rank_zero_lora(tmp_path):
    from krea2_lite.config import Krea2Config
    from krea2_lite.errors import LoraError
    from krea2_lite.lora import load_lora
    from krea2_lite.model import Krea2Transformer

    model = Krea2Transformer(Krea2Config.tiny())
    width = model.config.features
    path = tmp_path / "lora.safetensors"
    save_file({"blocks.0.attn.wq.lora_A.weight": torch.zeros(0, width),
               "blocks.0.attn.wq.lora_B.weight": torch.zeros(width, 0)}, str(path))
    with pytest.raises(LoraError, match=r"lora\.safetensors: module blocks\.0\.attn\.wq has rank 0"):
        load_lora(model, path)
    assert not any("lora" in name for name, _ in model.named_modules())
