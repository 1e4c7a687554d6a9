"""The one file finder: indexes, single or several files, pickles refused, duplicates never silent."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from krea2_lite.errors import CheckpointNotFoundError, SafetensorsSetError, UnsafeCheckpointFormatError
from krea2_lite.files.weight_files import find_weight_files, tensor_locations


def test_an_index_says_which_file_holds_each_key(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "one.safetensors")
    save_file({"b": torch.full((2,), 7.0)}, tmp_path / "two.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    found = tensor_locations(find_weight_files(tmp_path))
    assert {k: f.name for k, (f, _) in found.items()} == {"a": "one.safetensors", "b": "two.safetensors"}


def test_a_key_in_two_unindexed_files_is_refused(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(SafetensorsSetError, match="'a' is in both"):
        tensor_locations(find_weight_files(tmp_path))


def test_an_index_naming_a_missing_shard_or_key(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "b": "gone.safetensors"}}))
    with pytest.raises(CheckpointNotFoundError, match="gone.safetensors"):
        find_weight_files(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "b": "one.safetensors"}}))
    with pytest.raises(SafetensorsSetError, match="does not hold"):
        tensor_locations(find_weight_files(tmp_path))
    index.write_text(json.dumps({"weight_map": {"a": "../one.safetensors"}}))
    with pytest.raises(Exception, match="must be a file name"):
        find_weight_files(tmp_path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"])
def test_pickles_are_refused_by_name(tmp_path, suffix):
    (tmp_path / f"weights{suffix}").write_bytes(b"never opened")
    with pytest.raises(UnsafeCheckpointFormatError, match="pickle"):
        find_weight_files(tmp_path)
    with pytest.raises(UnsafeCheckpointFormatError, match="pickle"):
        find_weight_files(tmp_path / f"weights{suffix}")


def test_preferred_and_single(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "other.safetensors")
    weights = find_weight_files(tmp_path, preferred="diffusion_pytorch_model.safetensors", single=True)
    assert [f.name for f in weights.files] == ["diffusion_pytorch_model.safetensors"]
    with pytest.raises(CheckpointNotFoundError, match="several .safetensors"):
        find_weight_files(tmp_path, single=True)
    with pytest.raises(CheckpointNotFoundError, match="no model found"):
        find_weight_files(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)
