"""A GGUF transformer in the pipeline: `from_pretrained(..., transformer="x.gguf")` on the demo model,
planned from its stored bytes, streamed block by block (mixed types per block), LoRA beside it."""

import numpy as np
import pytest
import torch

from gguf_files import model_gguf
from krea2_lite import Krea2Pipeline, load_transformer
from krea2_lite.demo import demo_path
from krea2_lite.lora import load_lora, unload_lora
from krea2_lite.offload.sizes import transformer_weights
from krea2_lite.quantize.gguf_linear import GGUFLinear


@pytest.fixture(scope="module")
def demo_state():
    model = load_transformer(demo_path() / "transformer", dtype=torch.float32)
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def q8_file(demo_state, tmp_path_factory):
    return model_gguf(tmp_path_factory.mktemp("gguf") / "demo-Q8_0.gguf", demo_state, "Q8_0")[0]


@pytest.fixture(scope="module")
def mixed_file(demo_state, tmp_path_factory):
    """Blocks of different stored types (as a Q4_K_M-style file has): odd blocks Q4_0, MLPs of block 2 F16."""
    def kind(name):
        if name.startswith("blocks.2.mlp."):
            return "F16"
        return "Q4_0" if name.startswith(("blocks.1.", "blocks.3.")) else "Q8_0"
    return model_gguf(tmp_path_factory.mktemp("gguf") / "demo-mixed.gguf", demo_state, kind)[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def generate(pipe) -> np.ndarray:
    return np.asarray(pipe("a small red circle at the top left on a blue background", seed=3, progress=False).images[0])


def test_demo_q8_0_gguf_gives_the_float_image_within_a_few_db(q8_file, single_thread):
    reference = generate(Krea2Pipeline.from_pretrained("demo", device="cpu", dtype=torch.float32, progress=False))
    pipe = Krea2Pipeline.from_pretrained("demo", transformer=q8_file, device="cpu", dtype=torch.float32,
                                         progress=False)
    assert any(isinstance(m, GGUFLinear) for m in pipe.transformer.modules())
    assert psnr(generate(pipe), reference) > 30  # Q8_0: measured ≈ 40 dB on this prompt


def test_planner_counts_the_stored_bytes(mixed_file):
    model = load_transformer(mixed_file, dtype=torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert transformer_weights(model.config, model.stored_format, torch.bfloat16).total == held
    # and the same skeleton as the loader's: the GGUF layers count their blocks, not bf16 weights
    dense = transformer_weights(model.config, None, torch.bfloat16).total
    assert held < dense


def test_sequential_streaming_moves_blocks_of_mixed_types(mixed_file, single_thread):
    kwargs = dict(transformer=mixed_file, device="cpu", dtype=torch.float32, progress=False)
    resident = generate(Krea2Pipeline.from_pretrained("demo", offload="none", **kwargs))
    pipe = Krea2Pipeline.from_pretrained("demo", offload="sequential", **kwargs)
    streamer = pipe.offloader.streamer
    assert len({layout.size for layout in streamer.layouts.values()}) > 1  # the blocks do differ
    assert np.array_equal(generate(pipe), resident)


def test_lora_beside_gguf_layers(q8_file, tmp_path):
    from safetensors.torch import save_file

    model = load_transformer(q8_file, dtype=torch.float32)
    layer = model.blocks[0].attn.wq
    assert isinstance(layer, GGUFLinear)
    torch.manual_seed(0)
    a, b = torch.randn(4, layer.in_features) * 0.1, torch.randn(layer.out_features, 4) * 0.1
    save_file({"blocks.0.attn.wq.lora_A": a, "blocks.0.attn.wq.lora_B": b}, tmp_path / "l.safetensors",
              metadata={"rank": "4", "lora_alpha": "4", "lora_scale": "1.0"})
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        base = layer(x)
        load_lora(model, tmp_path / "l.safetensors")
        torch.testing.assert_close(layer(x), base + x @ a.T @ b.T, rtol=1e-5, atol=1e-5)
        unload_lora(model)
        assert torch.equal(layer(x), base)


def test_pipeline_replans_with_the_stored_bytes(q8_file):
    pipe = Krea2Pipeline.from_pretrained("demo", transformer=q8_file, device="cpu", dtype=torch.float32,
                                         progress=False)
    config = pipe.transformer.config
    stored = max(transformer_weights(config, pipe.transformer.stored_format, torch.float32).blocks)
    dense = max(transformer_weights(config, None, torch.float32).blocks)
    plan = pipe.plan(1.0, mode="none", width=64, height=64)  # what each call's re-plan counts
    assert plan.parts["block"] == stored < dense
