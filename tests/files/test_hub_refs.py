"""Hub references and the loader's tolerance of a skipped vision-only shard (no server needed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from krea2_lite.errors import CheckpointNotFoundError
from krea2_lite.files.hub_fetch import HubRef, parse_hub_ref
from krea2_lite.files.weight_files import find_weight_files, tensor_locations


@pytest.mark.parametrize("text, ref", [
    ("krea/Krea-2-Turbo", HubRef("krea/Krea-2-Turbo")),
    ("krea/Krea-2-Turbo@v1.0", HubRef("krea/Krea-2-Turbo", "v1.0")),
    ("krea/Krea-2-Turbo/turbo.safetensors", HubRef("krea/Krea-2-Turbo", None, "turbo.safetensors")),
    ("a/b@0123abc/loras/x.gguf", HubRef("a/b", "0123abc", "loras/x.gguf")),
    ("./models/x", None), ("/abs/path", None), ("~/x/y", None), ("demo", None),
    ("a/b/notes.txt", None),          # a file of a repo must be weights
    ("a/b/../c.safetensors", None),    # no climbing out of the repo
])
def test_hub_references(text, ref):
    assert parse_hub_ref(text) == ref


def _index(folder, shards: dict[str, dict]):
    weight_map = {}
    for name, tensors in shards.items():
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_a_missing_vision_only_shard_is_not_needed_but_a_missing_text_shard_is(tmp_path):
    text = {"language_model.embed_tokens.weight": torch.zeros(4, 2)}
    vision = {"visual.patch_embed.proj.weight": torch.zeros(2, 2)}
    save_file(text, str(tmp_path / "model-1.safetensors"))
    _index(tmp_path, {"model-1.safetensors": text, "model-2.safetensors": vision})  # model-2 never fetched
    found = tensor_locations(find_weight_files(tmp_path, preferred="model.safetensors"))
    assert list(found) == ["language_model.embed_tokens.weight"]
    _index(tmp_path, {"model-1.safetensors": vision, "model-2.safetensors": text})
    (tmp_path / "model-1.safetensors").unlink()
    save_file(vision, str(tmp_path / "model-1.safetensors"))
    with pytest.raises(CheckpointNotFoundError, match="missing.*model-2.safetensors"):
        find_weight_files(tmp_path, preferred="model.safetensors")
