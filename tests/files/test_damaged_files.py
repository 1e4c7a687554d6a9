"""Every reader in files/ (and the loaders above it) names the damaged file in its message: a
truncated or garbled safetensors file, a bad JSON file, a bad shard index, a checkpoint layout that
holds one tensor twice, a quantized folder's damaged manifest."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from krea2_lite.errors import CorruptCheckpointError, Krea2LiteError
from krea2_lite.files.checkpoint import SIGNATURE_KEYS, open_checkpoint
from krea2_lite.files.jsonfile import read_json
from krea2_lite.files.safetensors_headers import read_safetensors_header
from krea2_lite.files.weight_files import find_weight_files, tensor_locations
from krea2_lite.loading.transformer import describe_transformer, load_transformer


def _tensors(prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + key: torch.ones(4, 4) for key in ("a.weight", "b.weight")}


def _read_folder(folder):
    return tensor_locations(find_weight_files(folder))


def _raw_safetensors(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _truncated(path):
    save_file(_tensors(), str(path))
    path.write_bytes(path.read_bytes()[:-10])


SAFETENSORS_DAMAGE = {
    "truncated": _truncated,
    "empty": lambda path: path.write_bytes(b""),
    "too short": lambda path: path.write_bytes(b"\x01\x02"),
    "header past the end": lambda path: path.write_bytes(struct.pack("<Q", 10**6) + b"{}"),
    "header not JSON": lambda path: _raw_safetensors(path, b"{not json"),
    "header not UTF-8": lambda path: _raw_safetensors(path, b"\xff\xfe\xfd"),
    "header a list": lambda path: _raw_safetensors(path, b"[1, 2]"),
    "entry without offsets": lambda path: _raw_safetensors(path, b'{"a": {"dtype": "F32", "shape": [1]}}', b"\0" * 4),
    "relabelled dtype": lambda path: _raw_safetensors(
        path, b'{"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8),
    "unknown dtype": lambda path: _raw_safetensors(
        path, b'{"a": {"dtype": "Q3", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8),
}


@pytest.mark.parametrize("damage", sorted(SAFETENSORS_DAMAGE))
def test_a_damaged_safetensors_file_is_named(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    SAFETENSORS_DAMAGE[damage](path)
    for read in (lambda: read_safetensors_header(path), lambda: _read_folder(tmp_path), lambda: load_transformer(path)):
        with pytest.raises(CorruptCheckpointError) as info:
            read()
        assert str(path) in str(info.value), (damage, str(info.value))


@pytest.mark.parametrize("text", ["{", "", "[1, 2]", '"a string"', "\udcff"])
def test_a_bad_json_file_is_named(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CorruptCheckpointError) as info:
        read_json(path, what="config")
    assert str(path) in str(info.value)


def test_a_diffusers_folder_with_a_damaged_config_names_it(tmp_path):
    save_file(_tensors(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text('{"rope_theta": ')
    with pytest.raises(CorruptCheckpointError) as info:
        load_transformer(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def _index(folder, weight_map, raw: str | None = None):
    path = folder / "model.safetensors.index.json"
    path.write_text(raw if raw is not None else json.dumps({"weight_map": weight_map}))
    return path


INDEX_DAMAGE = {
    "not JSON": lambda folder: _index(folder, None, raw="{"),
    "no weight_map": lambda folder: _index(folder, None, raw="{}"),
    "weight_map a list": lambda folder: _index(folder, None, raw='{"weight_map": []}'),
    "a path outside the folder": lambda folder: _index(folder, {"a.weight": "../model.safetensors"}),
    "a missing shard": lambda folder: _index(folder, {"a.weight": "gone.safetensors"}),
    "a key its shard lacks": lambda folder: _index(folder, {"a.weight": "model.safetensors",
                                                           "z.weight": "model.safetensors"}),
}


@pytest.mark.parametrize("damage", sorted(INDEX_DAMAGE))
def test_a_bad_shard_index_is_named(tmp_path, damage):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    index = INDEX_DAMAGE[damage](tmp_path)
    with pytest.raises(Krea2LiteError) as info:
        _read_folder(tmp_path)
    assert str(index) in str(info.value), str(info.value)


def test_one_tensor_in_two_files_names_both(tmp_path):
    save_file(_tensors(), str(tmp_path / "one.safetensors"))
    save_file(_tensors(), str(tmp_path / "two.safetensors"))
    with pytest.raises(CorruptCheckpointError) as info:
        _read_folder(tmp_path)
    assert str(tmp_path / "one.safetensors") in str(info.value) and str(tmp_path / "two.safetensors") in str(info.value)


def test_a_comfyui_file_holding_a_tensor_twice_is_named(tmp_path):
    state = {f"model.diffusion_model.{key}": torch.ones(2) for key in (*SIGNATURE_KEYS, "blocks.0.x")}
    state["first.weight"] = torch.ones(2)  # the bare name too: two copies of one tensor
    path = tmp_path / "comfy.safetensors"
    save_file(state, str(path))
    with pytest.raises(CorruptCheckpointError) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value) and "first.weight" in str(info.value)


@pytest.mark.parametrize("edit", [{"config": "garbage"}, {"config": {"features": "x", "nonsense": 1}},
                                  {"quant": {"dtype": "int9"}}, {"config": None}])
def test_a_damaged_manifest_is_named(tmp_path, edit):
    manifest = {"format": "krea2_lite.quantized", "format_version": 1, "quant": {"dtype": "int8", "modules": []},
                "config": {}, **edit}
    (tmp_path / "krea2_lite.json").write_text(json.dumps(manifest))
    for read in (lambda: describe_transformer(tmp_path, None), lambda: load_transformer(tmp_path)):
        with pytest.raises(CorruptCheckpointError) as info:
            read()
        assert str(tmp_path / "krea2_lite.json") in str(info.value), str(info.value)
