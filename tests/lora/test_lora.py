"""LoRA: every file layout, unmerged branches on quantized layers, exact unload, merge, errors, CLI.

Tolerances (tiny random model, random rank-4 LoRA on every linear layer; measured on CPU, the
worst of int8 / fp8 / int4):
- Layer level, the issue's statement: quantized layer + LoRA vs the quantized layer's own output
  plus s·B(A·x) computed in float64, as max |error| / max |expected|. fp32 activations: 4.6e-8
  (bound 1e-6); bf16 activations: 3.4e-3 (bound 1e-2: A, B, the branch and the final add are
  bf16, 2^-8 = 3.9e-3).
- Model level, fp32 activations: quantized + LoRA vs a float32 model whose weights are the
  dequantized weights plus s·alpha/r·B·A: relative L2 error 2.6e-7 (bound 1e-5), while the LoRA
  moves the output by 21% (asserted > 2%).
- Merge vs unmerged branch: relative L2 2.6e-7 at fp32 (bound 1e-5), 6.3e-3 at bf16 (bound 2e-2).
- Unload, scale 0, unmerge: bit-exact (torch.equal), no tolerance.
"""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from krea2_lite import Krea2Config, Krea2Transformer, load_transformer
from krea2_lite.errors import CorruptCheckpointError, LoraError, UnsafeCheckpointFormatError
from krea2_lite.lora import load_lora, loaded_loras, lora_bytes, set_lora_scale, unload_lora
from krea2_lite.lora.formats import read_lora
from krea2_lite.lora.names import diffusers_to_official, official_to_diffusers
from factories import random_inputs

CFG = Krea2Config.tiny()  # 2 blocks, width 64: 56 linear layers
RANK, ALPHA = 4, 6.0      # multiplier alpha/rank = 1.5
DTYPES = ["int8", "fp8", "int4"]


@pytest.fixture(scope="module", autouse=True)
def _threads(single_thread):
    yield


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random tiny checkpoint (official keys), norm scales and modulation tables perturbed too."""
    torch.manual_seed(0)
    model = Krea2Transformer(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("lora_src") / "krea2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def inputs():
    return random_inputs(CFG, batch=1, txt_len=3, rows=2, cols=3)


def linear_names(model) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or hasattr(m, "qdata")}


def random_lora(shapes: dict[str, tuple[int, int]], seed: int, rank: int = RANK):
    """{official module: (A (r, in), B (out, r))}, float32, sized to move outputs noticeably."""
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, i, generator=g) / math.sqrt(i), torch.randn(o, rank, generator=g) * 0.05)
            for n, (o, i) in shapes.items()}


def write_lora(folder, pairs, layout: str, alpha: float = ALPHA):
    """Write `pairs` in one of the layouts people have; returns the file path."""
    tensors, metadata = {}, None
    name = f"{layout}.safetensors"
    for module, (a, b) in pairs.items():
        diff = official_to_diffusers(module)
        if layout == "krea2-training":  # krea-2 train.py: no `.weight`, alpha in the header
            tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = a, b
            metadata = {"rank": str(RANK), "lora_alpha": str(alpha), "lora_scale": "1.0"}
        elif layout == "krea2-comfyui":  # convert_lora_to_comfyui.py: multiplier folded into B
            tensors[f"diffusion_model.{module}.lora_A.weight"] = a
            tensors[f"diffusion_model.{module}.lora_B.weight"] = b * (alpha / RANK)
        elif layout == "diffusers":  # save_lora_weights: transformer. prefix, alpha in adapter metadata
            tensors[f"transformer.{diff}.lora_A.weight"], tensors[f"transformer.{diff}.lora_B.weight"] = a, b
            metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
                {"transformer.r": RANK, "transformer.lora_alpha": alpha})}
        elif layout == "peft":  # PEFT save_pretrained: adapter_model.safetensors + adapter_config.json
            tensors[f"base_model.model.{diff}.lora_A.weight"] = a
            tensors[f"base_model.model.{diff}.lora_B.weight"] = b
            name = "adapter_model.safetensors"
            folder = folder / "peft"
            folder.mkdir(exist_ok=True)
            (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": alpha}))
        elif layout in ("kohya", "kohya-diffusers"):  # flattened names, per-module alpha tensors
            flat = "lora_unet_" + (module if layout == "kohya" else diff).replace(".", "_")
            tensors[f"{flat}.lora_down.weight"], tensors[f"{flat}.lora_up.weight"] = a, b
            tensors[f"{flat}.alpha"] = torch.tensor(alpha)
        else:
            raise ValueError(layout)
    path = folder / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


LAYOUTS = ["krea2-training", "krea2-comfyui", "diffusers", "peft", "kohya", "kohya-diffusers"]


def test_official_and_diffusers_names_round_trip(source):
    names = linear_names(load_transformer(source, dtype=torch.float32))
    assert len(names) == 56
    for name in names:
        assert diffusers_to_official(official_to_diffusers(name)) == name
    assert official_to_diffusers("blocks.1.attn.wo") == "transformer_blocks.1.attn.to_out.0"
    assert official_to_diffusers("txtfusion.refiner_blocks.0.mlp.up") == "text_fusion.refiner_blocks.0.ff.up"
    assert official_to_diffusers("tproj.1") == "time_mod_proj"


def test_every_layout_loads_to_the_same_deltas(source, inputs, tmp_path):
    model = load_transformer(source, dtype=torch.float32)
    shapes = linear_names(model)
    pairs = random_lora(shapes, seed=1)
    expected = {n: ALPHA / RANK * (b @ a) for n, (a, b) in pairs.items()}
    outputs = []
    for layout in LAYOUTS:
        file, parsed = read_lora(write_lora(tmp_path, pairs, layout), shapes, CFG.layers)
        assert set(parsed) == set(shapes), layout
        for name, pair in parsed.items():
            torch.testing.assert_close(pair.delta(), expected[name], rtol=1e-6, atol=1e-7, msg=layout)
        load_lora(model, file, scale=0.5, name=layout)
        with torch.no_grad():
            outputs.append(model(*inputs))
        unload_lora(model, layout)
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model(*inputs), outputs[0], rtol=1e-3)  # the LoRA does something


def test_alpha_sources_and_key_variants(source, tmp_path):
    shapes = linear_names(load_transformer(source, dtype=torch.float32))
    pairs = random_lora({n: shapes[n] for n in ("blocks.0.attn.wq", "blocks.0.attn.wk", "first")}, seed=18)
    product = {n: b @ a for n, (a, b) in pairs.items()}

    def multipliers(path):
        return {n: p.multiplier for n, p in read_lora(path, shapes, CFG.layers)[1].items()}

    # PEFT's alpha_pattern (diffusers module names) overrides lora_alpha for the modules it matches.
    tensors = {f"transformer.{official_to_diffusers(n)}.lora_{s}.weight": t
               for n, (a, b) in pairs.items() for s, t in (("A", a), ("B", b))}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 8, "transformer.r": RANK,
                                                 "transformer.alpha_pattern": {"attn.to_q": 2}})}
    save_file(tensors, tmp_path / "pattern.safetensors", metadata=meta)
    assert multipliers(tmp_path / "pattern.safetensors") == {"blocks.0.attn.wq": 0.5, "blocks.0.attn.wk": 2.0,
                                                             "first": 2.0}
    # krea-2 training metadata: lora_alpha / rank × lora_scale.
    tensors = {f"{n}.lora_{s}": t for n, (a, b) in pairs.items() for s, t in (("A", a), ("B", b))}
    save_file(tensors, tmp_path / "train.safetensors", metadata={"lora_alpha": "16", "lora_scale": "0.5"})
    assert set(multipliers(tmp_path / "train.safetensors").values()) == {2.0}
    # No alpha anywhere: alpha = rank. PEFT's `.default` adapter infix.
    tensors = {f"diffusion_model.{n}.lora_{s}.default.weight": t
               for n, (a, b) in pairs.items() for s, t in (("A", a), ("B", b))}
    save_file(tensors, tmp_path / "plain.safetensors")
    _, parsed = read_lora(tmp_path / "plain.safetensors", shapes, CFG.layers)
    for name, pair in parsed.items():
        assert pair.multiplier == 1.0 and torch.equal(pair.delta(), product[name])
    # A PEFT folder (adapter_model.safetensors + adapter_config.json) given as the folder.
    folder = write_lora(tmp_path, pairs, "peft").parent
    assert set(multipliers(folder).values()) == {ALPHA / RANK}


def reference_with_deltas(source, quantized, deltas: dict[str, torch.Tensor]):
    """A float32 model whose linear weights are the quantized model's (dequantized) plus `deltas`."""
    reference = load_transformer(source, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if hasattr(module, "qdata"):
                reference.get_submodule(name).weight.copy_(module.dequantize())
        for name, delta in deltas.items():
            reference.get_submodule(name).weight.add_(delta)
    return reference


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_plus_lora_equals_fp32_reference_and_unloads_exactly(source, inputs, tmp_path, dtype):
    model = load_transformer(source, dtype=torch.float32, quant=dtype)
    shapes = linear_names(model)
    pairs = random_lora(shapes, seed=2)
    path = write_lora(tmp_path, pairs, "kohya")
    scale = 0.7
    with torch.no_grad():
        base = model(*inputs)
        load_lora(model, path, scale=scale)
        out = model(*inputs)
        expected = reference_with_deltas(source, model, {n: scale * ALPHA / RANK * (b @ a)
                                                         for n, (a, b) in pairs.items()})(*inputs)
        unload_lora(model)
        after = model(*inputs)
    assert rel(out, base) > 0.02  # the LoRA moves the output
    assert rel(out, expected) < 1e-5
    assert torch.equal(after, base)


@pytest.mark.parametrize("act_dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_output_is_quantized_output_plus_fp32_delta(source, tmp_path, dtype, act_dtype, bound):
    model = load_transformer(source, dtype=act_dtype, quant=dtype)
    shapes = linear_names(model)
    pairs = random_lora(shapes, seed=3)
    load_lora(model, write_lora(tmp_path, pairs, "diffusers"), scale=-0.8)
    g = torch.Generator().manual_seed(4)
    for name in ("blocks.0.attn.wq", "blocks.1.mlp.down", "txtfusion.refiner_blocks.0.attn.wo"):
        layer = model.get_submodule(name)
        assert hasattr(layer, "qdata")
        x = torch.randn(5, layer.in_features, generator=g).to(act_dtype)
        a, b = pairs[name]
        with torch.no_grad():
            got = layer(x).double()
            base = layer.forward(x).double()  # forward() bypasses the hook: the quantized matmul alone
        expected = base + (-0.8 * ALPHA / RANK) * (x.double() @ a.double().T @ b.double().T)
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        assert error < bound, (name, error)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_branch_beside_the_triton_qmatmul(source, tmp_path, dtype, monkeypatch, spy):
    """The hook is independent of the matmul backend: with the Triton kernel (interpreter here)
    the layer gives the kernel's output plus the branch."""
    import krea2_lite.kernels.qmatmul_triton as qmt

    model = load_transformer(source, dtype=torch.float32, quant=dtype)
    pairs = random_lora(linear_names(model), seed=14)
    load_lora(model, write_lora(tmp_path, pairs, "kohya"), scale=0.9)
    calls = spy(qmt, "qmatmul_triton")
    monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
    layer = model.blocks[1].attn.gate
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(15))
    a, b = pairs["blocks.1.attn.gate"]
    with torch.no_grad():
        got, kernel = layer(x), layer.forward(x)
    assert len(calls) == 2, "the Triton qmatmul was not used"
    torch.testing.assert_close(got, kernel + 0.9 * ALPHA / RANK * (x @ a.T @ b.T), rtol=1e-5, atol=1e-6)


def test_branch_under_autograd_is_out_of_place(source, tmp_path):
    """With a graph to keep, the branch is added out of place and gradients reach the input."""
    model = load_transformer(source, dtype=torch.float32)
    pairs = random_lora(linear_names(model), seed=16)
    load_lora(model, write_lora(tmp_path, pairs, "peft"), scale=0.4)
    layer = model.blocks[0].mlp.up
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(17), requires_grad=True)
    with torch.no_grad():
        expected = layer(x)
    y = layer(x)
    assert y.requires_grad and y.shape == (2, 3, layer.out_features)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    a, b = pairs["blocks.0.mlp.up"]
    full = layer.weight + 0.4 * ALPHA / RANK * (b @ a)
    torch.testing.assert_close(x.grad, full.sum(0).expand_as(x), rtol=1e-5, atol=1e-6)


def snapshot(model):
    return {k: (v.data_ptr(), v.detach().clone()) for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    state = model.state_dict()
    assert list(state) == list(before)
    for key, (ptr, value) in before.items():
        assert state[key].data_ptr() == ptr, key
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_tensors_are_never_rewritten_and_memory_is_the_lora_only(source, inputs, tmp_path, dtype):
    model = load_transformer(source, dtype=torch.float32, quant=dtype)
    keys = set(model.state_dict())
    assert any(k.endswith(".qdata") for k in keys)
    assert (dtype == "int4") == any(k.endswith(".shift") for k in keys)
    before = snapshot(model)
    buffers = [n for n, _ in model.named_buffers()]
    shapes = linear_names(model)
    load_lora(model, write_lora(tmp_path, random_lora(shapes, seed=5), "krea2-comfyui"), name="a")
    load_lora(model, write_lora(tmp_path, random_lora(shapes, seed=6, rank=2), "kohya"), scale=2.0, name="b")
    assert_untouched(model, before)
    assert [n for n, _ in model.named_buffers()] == buffers
    # Memory added: A and B of every layer in the activation dtype (float32 here), nothing else.
    expected = sum((RANK + 2) * (o + i) * 4 for o, i in shapes.values())
    assert lora_bytes(model) == expected
    with torch.no_grad():
        model(*inputs)
        set_lora_scale(model, 0.3, "a")
        model(*inputs)
        unload_lora(model, "b")
        model(*inputs)
        unload_lora(model)
    assert_untouched(model, before)
    assert lora_bytes(model) == 0 and loaded_loras(model) == {}
    assert not any(m._forward_hooks for m in model.modules())


def test_several_loras_each_with_its_own_scale(source, inputs, tmp_path):
    model = load_transformer(source, dtype=torch.float32, quant="int8")
    shapes = linear_names(model)
    first, second = random_lora(shapes, seed=7), random_lora(dict(list(shapes.items())[::3]), seed=8)
    with torch.no_grad():
        base = model(*inputs)
        assert load_lora(model, write_lora(tmp_path, first, "krea2-training"), scale=0.5) == "krea2-training"
        only_first = model(*inputs)
        load_lora(model, write_lora(tmp_path, second, "diffusers"), scale=1.5, name="second")
        assert loaded_loras(model) == {"krea2-training": 0.5, "second": 1.5}
        both = model(*inputs)
        deltas = {n: 0.5 * ALPHA / RANK * (b @ a) for n, (a, b) in first.items()}
        for n, (a, b) in second.items():
            deltas[n] = deltas[n] + 1.5 * ALPHA / RANK * (b @ a)
        assert rel(both, reference_with_deltas(source, model, deltas)(*inputs)) < 1e-5
        set_lora_scale(model, 0.0, "second")  # scale 0: exactly as if not loaded
        assert torch.equal(model(*inputs), only_first)
        set_lora_scale(model, 1.5, "second")
        unload_lora(model, "krea2-training")
        set_lora_scale(model, 0.0)  # every LoRA
        assert torch.equal(model(*inputs), base)
        set_lora_scale(model, 1.5)
        assert not torch.equal(model(*inputs), base)
        unload_lora(model)
        assert torch.equal(model(*inputs), base)
    with pytest.raises(LoraError, match=r"no LoRA named 'second' is loaded \(loaded: none\)"):
        unload_lora(model, "second")


def test_name_clash_and_bad_scale(source, tmp_path):
    model = load_transformer(source, dtype=torch.float32, quant="int8")
    path = write_lora(tmp_path, random_lora(linear_names(model), seed=9), "kohya")
    load_lora(model, path)
    with pytest.raises(LoraError, match="a LoRA named 'kohya' is already loaded"):
        load_lora(model, path)
    with pytest.raises(LoraError, match="no LoRA named 'other' is loaded .loaded: \\['kohya'\\]"):
        set_lora_scale(model, 1.0, "other")
    with pytest.raises(LoraError, match="finite number"):
        set_lora_scale(model, float("nan"))
    assert loaded_loras(model) == {"kohya": 1.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_into_dense_weights_and_unmerge_exactly(source, inputs, tmp_path, dtype):
    model = load_transformer(source, dtype=dtype)
    shapes = linear_names(model)
    pairs = random_lora(shapes, seed=10)
    path = write_lora(tmp_path, pairs, "kohya-diffusers")
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(*inputs)
        load_lora(model, path, scale=0.6, name="hooked")
        hooked = model(*inputs)
        unload_lora(model)
        load_lora(model, path, scale=0.6, merge=True)
        assert not any(m._forward_hooks for m in model.modules())
        merged = model(*inputs)
        wq = model.blocks[0].attn.wq.weight
        a, b = pairs["blocks.0.attn.wq"]
        w0 = before["blocks.0.attn.wq.weight"][1]
        delta = ALPHA / RANK * (b @ a)  # merged LoRAs keep A and B in float32
        ulp = 1e-5 if dtype == torch.float32 else 2 ** -7  # a last-bit tie may round the other way
        torch.testing.assert_close(wq.float(), (w0.float() + 0.6 * delta).to(dtype).float(), rtol=ulp, atol=1e-6)
        set_lora_scale(model, -1.0)  # re-merged from W₀: the same bits as merging at -1 directly
        fresh = load_transformer(source, dtype=dtype)
        load_lora(fresh, path, scale=-1.0, merge=True)
        assert torch.equal(wq, fresh.blocks[0].attn.wq.weight)
        unload_lora(model)
        after = model(*inputs)
    assert rel(merged.float(), hooked.float()) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert rel(merged.float(), base.float()) > 0.02
    state = model.state_dict()
    assert list(state) == list(before)
    for key, (ptr, value) in before.items():
        assert state[key].data_ptr() == ptr and torch.equal(state[key], value), key
    assert torch.equal(after, base)


def test_merge_is_refused_on_quantized_layers(source, tmp_path):
    model = load_transformer(source, dtype=torch.float32, quant="int8")
    path = write_lora(tmp_path, random_lora(linear_names(model), seed=11), "kohya")
    before = snapshot(model)
    with pytest.raises(LoraError, match=r"merge=True would rewrite quantized weights \(blocks\.0\.attn\.wq and"):
        load_lora(model, path, merge=True)
    assert loaded_loras(model) == {} and lora_bytes(model) == 0
    assert_untouched(model, before)


# ---- errors ------------------------------------------------------------------------------------

def _pair(o, i, r=RANK):
    return torch.randn(r, i), torch.randn(o, r)


BAD_FILES = {
    "flux": ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 3072),
              "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(9216, 4)},
             "double_blocks.0.img_attn.qkv.lora_A.weight: this LoRA targets FLUX-style modules"),
    "flux-kohya": ({"lora_unet_single_blocks_3_linear1.lora_down.weight": torch.randn(4, 8)},
                   "lora_unet_single_blocks_3_linear1.lora_down.weight: this LoRA targets FLUX-style"),
    "sd-unet": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8)},
                "Stable Diffusion UNet"),
    "qwen-image": ({"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": torch.randn(4, 64)},
                   "two-stream MMDiT"),
    "block-40": ({"diffusion_model.blocks.40.attn.wq.lora_A.weight": torch.randn(4, 64)},
                 re.escape("key diffusion_model.blocks.40.attn.wq.lora_A.weight: it targets module "
                           "blocks.40.attn.wq (block 40), which this 2-block model does not have")),
    "block-40-diffusers": ({"transformer.transformer_blocks.40.attn.to_q.lora_A.weight": torch.randn(4, 64)},
                           "targets module blocks.40.attn.wq .block 40., which this 2-block model"),
    "block-40-kohya": ({"lora_unet_blocks_40_attn_wq.lora_down.weight": torch.randn(4, 64)},
                       "targets module blocks_40_attn_wq .block 40."),
    "rank": (dict(zip(("blocks.0.attn.wq.lora_A.weight", "blocks.0.attn.wq.lora_B.weight"),
                      (torch.randn(8, 64), torch.randn(64, 4)))),
             r"rank mismatch for module blocks.0.attn.wq: lora_A blocks.0.attn.wq.lora_A.weight is \(r=8, "
             r"in=64\) but lora_B blocks.0.attn.wq.lora_B.weight is \(out=64, r=4\)"),
    "shape": (dict(zip(("lora_unet_blocks_1_mlp_up.lora_down.weight", "lora_unet_blocks_1_mlp_up.lora_up.weight"),
                       _pair(256, 6144))),
              r"shape mismatch for module blocks.1.mlp.up: the LoRA maps in=6144 → out=256 .* but the layer is "
              r"in=64 → out=256"),
    "half-pair": ({"transformer.transformer_blocks.0.ff.down.lora_A.weight": torch.randn(4, 256)},
                  "key transformer.transformer_blocks.0.ff.down.lora_A.weight has no matching lora_B / lora_up "
                  "tensor for module blocks.0.mlp.down"),
    "text-encoder": ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 8)},
                     "targets the text encoder"),
    "loha": ({"lora_unet_blocks_0_attn_wq.hada_w1_a": torch.randn(4, 8)}, "belongs to a LoHa adapter"),
    "full-weight": ({"blocks.0.attn.wq.weight": torch.randn(64, 64)}, "is not a LoRA tensor"),
    "nan": (dict(zip(("blocks.0.attn.wq.lora_A.weight", "blocks.0.attn.wq.lora_B.weight"),
                     (torch.full((4, 64), float("nan")), torch.randn(64, 4)))), "contains NaN or inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_clear_errors_name_the_file_and_key(source, tmp_path, case):
    model = load_transformer(source, dtype=torch.float32, quant="int8")
    tensors, message = BAD_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, path)
    before = snapshot(model)
    with pytest.raises(LoraError, match=message) as info:
        load_lora(model, path)
    assert str(path) in str(info.value)
    assert loaded_loras(model) == {} and not any(m._forward_hooks for m in model.modules())
    assert_untouched(model, before)


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
def test_pickle_lora_files_are_refused_unopened(source, tmp_path, suffix):
    model = load_transformer(source, dtype=torch.float32)
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(b"\x80\x04 not even a pickle")
    with pytest.raises(UnsafeCheckpointFormatError, match="never opened"):
        load_lora(model, path)


def test_corrupt_file_and_folder_with_several_files(source, tmp_path):
    model = load_transformer(source, dtype=torch.float32)
    (tmp_path / "a.safetensors").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        load_lora(model, tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(b"junk")
    with pytest.raises(LoraError, match="exactly one .safetensors file"):
        load_lora(model, tmp_path)


# ---- pipeline and CLI --------------------------------------------------------------------------

def test_cli_lora_argument_parsing(tmp_path):
    from krea2_lite.cli.generate_settings import lora_argument
    from krea2_lite.cli.subcommands import build_parser

    assert lora_argument("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_argument("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert lora_argument("a:b/c.safetensors:-1e-1") == ("a:b/c.safetensors", -0.1)
    assert lora_argument(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert lora_argument("C:/loras/x.safetensors:.75") == ("C:/loras/x.safetensors", 0.75)
    odd = tmp_path / "v:2"  # an existing file whose name ends in ':number' is taken whole
    odd.write_bytes(b"")
    assert lora_argument(str(odd)) == (str(odd), 1.0)
    args = build_parser().parse_args(["generate", "p", "--model", "m", "--lora", "a.safetensors",
                                      "--lora", "b.safetensors:0.3"])
    assert args.lora == [("a.safetensors", 1.0), ("b.safetensors", 0.3)]
    assert build_parser().parse_args(["generate", "p", "--model", "m"]).lora == []


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    from factories import tiny_diffusers_pipeline

    root = tmp_path_factory.mktemp("lora_pipe") / "pipe"
    tiny_diffusers_pipeline().save_pretrained(root)
    return root


def pipeline_lora(folder):
    """A LoRA over every block linear of the tiny pipeline's transformer."""
    from factories import PIPELINE_CONFIG

    with torch.device("meta"):
        shapes = linear_names(Krea2Transformer(PIPELINE_CONFIG))
    return write_lora(folder, random_lora({n: s for n, s in shapes.items() if n.startswith("blocks.")}, seed=12),
                      "krea2-comfyui")


def test_pipeline_verbs_and_cli_apply_the_lora(pipeline_folder, tmp_path):
    from PIL import Image

    from krea2_lite.cli.subcommands import main
    from krea2_lite.pipeline import Krea2Pipeline

    path = pipeline_lora(tmp_path)
    pipe = Krea2Pipeline.from_pretrained(pipeline_folder, device="cpu", dtype=torch.float32, progress=False)
    kwargs = dict(width=32, height=32, steps=2, seed=3, progress=False)
    pixels = lambda result: np.asarray(result.images[0], dtype=np.int16)  # noqa: E731
    base = pixels(pipe("a fox", **kwargs))
    assert pipe.load_lora(path, scale=12.0) == "krea2-comfyui"
    styled = pixels(pipe("a fox", **kwargs))
    assert np.abs(styled - base).max() > 10
    pipe.set_lora_scale(0.0)
    assert np.array_equal(pixels(pipe("a fox", **kwargs)), base)
    pipe.set_lora_scale(1.5)
    pipe.unload_lora()
    assert np.array_equal(pixels(pipe("a fox", **kwargs)), base)

    out = tmp_path / "cli.png"
    code = main(["generate", "a fox", "--model", str(pipeline_folder), "--width", "32", "--height", "32",
                 "--steps", "2", "--seed", "3", "--cfg", str(pipe.defaults.guidance), "--dtype", "fp32",
                 "--device", "cpu", "--output", str(out), "--quiet", "--lora", f"{path}:12"])
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(out), dtype=np.int16), styled)


def test_lora_beside_sequential_offload_gives_the_same_image(pipeline_folder, tmp_path):
    """Streamed blocks sit on the host between uses; their LoRA lives on the compute device."""
    from krea2_lite.pipeline import Krea2Pipeline

    path = pipeline_lora(tmp_path)
    results = []
    for offload in ("none", "sequential"):
        pipe = Krea2Pipeline.from_pretrained(pipeline_folder, device="cpu", dtype=torch.float32, offload=offload,
                                             progress=False)
        pipe.load_lora(path, scale=12.0)
        results.append(pipe("a fox", width=32, height=32, steps=2, seed=3, progress=False).latents)
    assert pipe.memory_plan.mode == "sequential" and pipe.offloader.streamer is not None
    assert torch.equal(results[0], results[1])
    pipe.set_lora_scale(0.0)
    assert not torch.allclose(pipe("a fox", width=32, height=32, steps=2, seed=3, progress=False).latents,
                              results[1], atol=1e-2)  # the LoRA did apply
    with pytest.raises(LoraError, match=r"merge=True is not available while a memory plan \('sequential'\)"):
        pipe.load_lora(path, name="merged", merge=True)


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_device_memory_added_is_the_lora_weights_only(source, tmp_path, cuda_device):
    """Not run on the CPU machines this was written on: skips without CUDA."""
    model = load_transformer(source, dtype=torch.bfloat16, quant="int8").to(cuda_device)
    shapes = linear_names(model)
    path = write_lora(tmp_path, random_lora(shapes, seed=13), "kohya")
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    load_lora(model, path)
    torch.cuda.synchronize()
    added, peak = torch.cuda.memory_allocated() - start, torch.cuda.max_memory_allocated() - start
    lora = lora_bytes(model)
    assert lora == sum(RANK * (o + i) * 2 for o, i in shapes.values())
    slack = 512 * 2 * len(shapes)  # the caching allocator rounds every tensor up to 512 bytes
    assert lora <= added <= lora + slack
    assert peak <= lora + slack
