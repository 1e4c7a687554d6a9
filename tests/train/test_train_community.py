"""Training over a community transformer file (`--transformer x.gguf`): the base stays in its stored
GGUF blocks (frozen, dequantized per layer in the forward), the planner counts the stored bytes, and
the LoRA trains."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from gguf_files import model_gguf
from krea2_lite import load_transformer
from krea2_lite.demo import demo_path
from krea2_lite.train import train_lora
from test_train_demo import OPTIONS, write_scene_folder


def test_a_lora_trains_over_a_gguf_transformer(tmp_path):
    state = {k: v.detach().float().contiguous()
             for k, v in load_transformer(demo_path() / "transformer", dtype=torch.float32).state_dict().items()}
    gguf = model_gguf(tmp_path / "demo-Q8_0.gguf", state, "Q8_0")[0]
    before = gguf.read_bytes()
    data = write_scene_folder(tmp_path / "data", 2)
    out = train_lora(str(demo_path()), transformer=str(gguf), data=data, output=tmp_path / "lora.safetensors",
                     steps=2, cache_dir=tmp_path / "cache", batch=2, **OPTIONS)
    lora = load_file(out)
    assert lora and any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)  # it trained
    assert gguf.read_bytes() == before  # the user's file is never written
