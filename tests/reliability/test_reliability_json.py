"""Reliability battery, JSON: every JSON file krea2_lite reads is parsed by `krea2_lite.files.jsonfile`;
damage gives a JsonFileError (a CorruptCheckpointError) naming the file and what was wrong, never
a bare JSONDecodeError / AttributeError / KeyError, and the folder is left as it was."""

import json

import pytest
import torch

from krea2_lite.files.checkpoint import open_checkpoint
from krea2_lite.loading.transformer import load_transformer
from krea2_lite.errors import CheckpointNotFoundError, CorruptCheckpointError, JsonFileError, LoraError
from krea2_lite.files.jsonfile import read_json
from krea2_lite.pipeline import Krea2Pipeline
from reliability_fixtures import copy_of, pipeline_folder, snapshot

NOT_JSON = '{"_class_name": "Krea2Pipeline", '  # a truncated write


def test_read_json_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(JsonFileError, match=r"x\.json: model index is not valid JSON \(line 3 column 3"):
        read_json(path, what="model index")


def test_read_json_wrong_type_and_missing_keys(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(JsonFileError, match=r"x\.json: shard index must be a JSON object, found a JSON array"):
        read_json(path, what="shard index")
    path.write_text('{"metadata": {}}')
    with pytest.raises(JsonFileError, match=r"x\.json: shard index lacks the required key\(s\) \['weight_map'\]"):
        read_json(path, required=("weight_map",), what="shard index")


def test_read_json_not_utf8_and_missing(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(JsonFileError, match=r"x\.json: config is not UTF-8"):
        read_json(path, what="config")
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.json: config not found"):
        read_json(tmp_path / "nope.json", what="config")
    assert read_json(tmp_path / "nope.json", default={}) == {}


@pytest.mark.parametrize("relative, content, match", [
    ("model_index.json", NOT_JSON, r"model_index\.json: model_index\.json is not valid JSON"),
    ("model_index.json", "[]", r"model_index\.json: model_index\.json must be a JSON object, found a JSON array"),
    ("scheduler/scheduler_config.json", NOT_JSON, r"scheduler_config\.json: scheduler config is not valid JSON"),
    ("transformer/config.json", '"a string"', r"transformer/config\.json: transformer config must be a JSON object"),
    ("text_encoder/config.json", NOT_JSON, r"text_encoder/config\.json: text encoder config is not valid JSON"),
    ("vae/config.json", "null", r"vae/config\.json: VAE config must be a JSON object, found null"),
    ("tokenizer/tokenizer.json", NOT_JSON, r"tokenizer\.json: tokenizer file tokenizer\.json is not valid JSON"),
    ("tokenizer/tokenizer_config.json", "[1]", r"tokenizer_config\.json: tokenizer file .* must be a JSON object"),
])
def test_damaged_pipeline_json_is_named(tmp_path, relative, content, match):
    folder = copy_of(pipeline_folder(), tmp_path / "pipe")
    (folder / relative).write_text(content)
    before = snapshot(folder)
    with pytest.raises(JsonFileError, match=match):
        Krea2Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, progress=False)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_model_index_of_the_wrong_types(tmp_path):
    folder = copy_of(pipeline_folder(), tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, is_distilled="yes")))
    with pytest.raises(ValueError, match="'is_distilled' must be true or false, got 'yes'"):
        Krea2Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, progress=False)
    (folder / "model_index.json").write_text(json.dumps(dict(index, krea2_lite=[20])))
    with pytest.raises(ValueError, match="'krea2_lite' must be a JSON object"):
        Krea2Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, progress=False)


@pytest.mark.parametrize("weight_map, match", [
    ("[]", r"'weight_map' must be a JSON object, found a JSON array"),
    ('{"first.weight": "../elsewhere.safetensors"}', r"weight_map\['first\.weight'\] must be a file name"),
    (None, r"shard index lacks the required key\(s\) \['weight_map'\]"),
])
def test_damaged_shard_index(tmp_path, weight_map, match):
    folder = copy_of(pipeline_folder() / "transformer", tmp_path / "transformer")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text('{"metadata": {}}' if weight_map is None else '{"weight_map": %s}' % weight_map)
    before = snapshot(folder)
    with pytest.raises(CorruptCheckpointError, match=match):
        open_checkpoint(folder)
    assert snapshot(folder) == before


def test_damaged_manifest_of_a_quantized_folder(tmp_path):
    folder = tmp_path / "q"
    (folder / "transformer").mkdir(parents=True)
    (folder / "krea2_lite.json").write_text('{"format": "krea2_lite.quantized", "format_version": 1')
    with pytest.raises(JsonFileError, match=r"krea2_lite\.json: quantized-folder manifest is not valid JSON"):
        load_transformer(folder)


def test_damaged_peft_adapter_config(tmp_path):
    from safetensors.torch import save_file

    from krea2_lite.lora import load_lora
    from krea2_lite.model import Krea2Transformer
    from krea2_lite.config import Krea2Config

    model = Krea2Transformer(Krea2Config.tiny())
    adapter = tmp_path / "adapter_model.safetensors"
    save_file({"base_model.model.blocks.0.attn.wq.lora_A.weight": torch.zeros(4, model.config.features),
               "base_model.model.blocks.0.attn.wq.lora_B.weight": torch.zeros(model.config.features, 4)}, adapter)
    (tmp_path / "adapter_config.json").write_text('{"lora_alpha": 8,')
    with pytest.raises(LoraError, match=r"adapter_config\.json: PEFT adapter config is not valid JSON"):
        load_lora(model, adapter)
