"""Kernel state with an owner: `KernelWorkspace` (scratch, the shared quantized activation), the
backend decided once per scope, and the W8A8 modules the quantizer swaps in (the model files stay
the plain spec)."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import krea2_lite.kernels.act_quant_torch as aqtorch
import krea2_lite.kernels.act_quant_triton as aqt
from krea2_lite import Krea2Config, load_transformer
from krea2_lite.kernels import KernelWorkspace, backend_scope, kernel_backend
from krea2_lite.kernels.workspace import release_workspaces, workspaces_of
from krea2_lite.model import Krea2Transformer
from krea2_lite.model.layers import Attention, SwiGLU
from krea2_lite.quantize import QuantizedLinear
from krea2_lite.quantize.w8a8_modules import FusedSwiGLU, SharedInputAttention, attach_workspace

CFG = Krea2Config.tiny(features=128, heads=4, kvheads=2, txtdim=64, txtheads=2, txtkvheads=2)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def spy(monkeypatch, module, name):
    """Count the calls of module.name (the dispatch imports it at call time, so the spy is seen)."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(k.get("up") is not None) or real(*a, **k))
    return calls


def quantized(module: nn.Module, names, act="int8", rotate=0) -> nn.Module:
    """`module` with the named linears replaced by W8A8 QuantizedLinear layers (no workspace yet)."""
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, leaf, QuantizedLinear.from_linear(getattr(owner, leaf), act, None, torch.float32,
                                                         activations=act, rotate=rotate))
    return module


def w8a8_attention(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.attn = Attention(128, 4, 2)
    return quantized(holder, ["attn.wq", "attn.wk", "attn.wv", "attn.gate", "attn.wo"], rotate=64)


def tiny_inputs():
    g = torch.Generator().manual_seed(1)
    txt, rows, cols = 5, 4, 4
    pos = torch.zeros(txt + rows * cols, 3)
    pos[txt:, 1] = torch.arange(rows).repeat_interleave(cols).float()
    pos[txt:, 2] = torch.arange(cols).repeat(rows).float()
    return (torch.randn(1, rows * cols, CFG.in_channels, generator=g),
            torch.randn(1, txt, CFG.txtlayers, CFG.txtdim, generator=g), torch.rand(1, generator=g), pos)


# ---------------------------------------------------------------- the workspace object
def test_scratch_reuse_growth_modes_and_release():
    ws = KernelWorkspace()
    cpu = torch.device("cpu")
    assert ws.scratch(cpu, torch.bfloat16, 10) is None  # autograd records: never hand out a reused buffer
    with torch.no_grad():
        a = ws.scratch(cpu, torch.bfloat16, 100)
        assert ws.scratch(cpu, torch.bfloat16, 50) is a  # reused
        assert ws.scratch(cpu, torch.bfloat16, 200).numel() == 200  # grown
        assert ws.nbytes == 400
    with torch.inference_mode():
        b = ws.scratch(cpu, torch.bfloat16, 100)
    with torch.no_grad():
        c = ws.scratch(cpu, torch.bfloat16, 100)
        c.mul_(2)  # not the inference tensor `b`: writable here
    assert b is not c and ws.nbytes == 400 + 200
    assert ws.release() == 600 and ws.nbytes == 0
    with torch.no_grad():
        assert ws.scratch(cpu, torch.bfloat16, 10) is not c  # allocated afresh after release


def test_shared_activation_lives_only_inside_its_scope():
    ws = KernelWorkspace()
    x, other = torch.randn(3, 8), torch.randn(3, 8)
    made = []

    def make():
        made.append(1)
        return torch.zeros(3, 8, dtype=torch.int8), torch.ones(3, 1)

    with ws.sharing(x):
        first = ws.shared_activation(x, ("int8", 0, False), make)
        assert ws.shared_activation(x, ("int8", 0, False), make) is first and len(made) == 1
        assert ws.nbytes == 3 * 8 + 3 * 4  # the shared copy is counted while it is held
        ws.shared_activation(x, ("int8", 64, False), make)  # another rotation: its own copy
        ws.shared_activation(other, ("int8", 0, False), make)  # another tensor: not shared
        assert len(made) == 3
    assert ws.nbytes == 0
    ws.shared_activation(x, ("int8", 0, False), make)  # outside the scope: computed every time
    assert len(made) == 4


def test_backend_is_decided_once_per_scope(monkeypatch):
    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    assert kernel_backend() == "torch"
    with backend_scope() as chosen:
        monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
        assert chosen == "torch" and kernel_backend() == "torch"  # pinned: the env is not read again
        with backend_scope():  # nested: keeps the outer decision
            assert kernel_backend() == "torch"
        with backend_scope("auto"):  # an explicit backend overrides for its scope
            assert kernel_backend() == "auto"
        assert kernel_backend() == "torch"
    assert kernel_backend() == "triton"  # scope closed: the variable decides again
    monkeypatch.setenv("KREA2_LITE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="KREA2_LITE_KERNELS='cuda' is not one of auto, triton, torch"):
        kernel_backend()
    with pytest.raises(ValueError, match="backend='fast'"):
        with backend_scope("fast"):
            pass

    @backend_scope()
    def decorated():
        return kernel_backend()

    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    assert decorated() == "torch"


def test_a_model_call_reads_the_backend_once(source, monkeypatch):
    """The variable is read at the start of a forward, not by every linear / attention call."""
    import os

    from krea2_lite.kernels import dispatch

    class CountingEnviron(dict):
        reads = 0

        def get(self, key, default=None):
            if key == "KREA2_LITE_KERNELS":
                CountingEnviron.reads += 1
            return super().get(key, default)

    model = load_transformer(source, dtype=torch.float32, quant="int8-w8a8")
    monkeypatch.setattr(dispatch.os, "environ", CountingEnviron(os.environ, KREA2_LITE_KERNELS="torch"))
    with torch.no_grad():
        model(*tiny_inputs())
    assert CountingEnviron.reads == 1


# ---------------------------------------------------------------- the swapped-in modules
@pytest.mark.parametrize("backend,module,name", [("torch", aqtorch, "act_quant_torch"),
                                                 ("triton", aqt, "act_quant_triton")])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_shared_input_is_quantized_once(monkeypatch, backend, module, name, mode):
    """wq/wk/wv/gate read one quantized copy of x — also under inference_mode, where the old
    version-counter cache was silently off and x was quantized four times."""
    plain = w8a8_attention()  # no workspace: every layer quantizes its own input
    shared = w8a8_attention()
    attach_workspace(shared, ["attn.wq", "attn.wk", "attn.wv", "attn.gate", "attn.wo"])
    assert type(shared.attn) is SharedInputAttention and type(plain.attn) is Attention
    x = torch.randn(2, 9, 128)
    monkeypatch.setenv("KREA2_LITE_KERNELS", backend)
    calls = spy(monkeypatch, module, name)
    grad_mode = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with grad_mode():
        ref = plain.attn(x)
        assert len(calls) == 5  # wq, wk, wv, gate, wo
        ours = shared.attn(x)
    assert len(calls) == 5 + 2  # the projections' shared input once, wo's input once
    assert torch.equal(ours, ref)
    assert shared.kernel_workspace.nbytes == 0  # the 8-bit copy went with its scope


def test_whole_w8a8_model_quantizes_each_shared_input_once(source, monkeypatch):
    """Per block under inference_mode: attention input, wo input, MLP input (gate/up), down input."""
    model = load_transformer(source, dtype=torch.float32, quant="int8-w8a8")
    blocks = CFG.layers + 4  # the transformer blocks and the four text-fusion blocks
    assert sum(isinstance(m, SharedInputAttention) for m in model.modules()) == blocks
    assert sum(isinstance(m, FusedSwiGLU) for m in model.modules()) == blocks
    assert workspaces_of(model) == [model.kernel_workspace]
    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    calls = spy(monkeypatch, aqtorch, "act_quant_torch")
    with torch.inference_mode():
        model(*tiny_inputs())
    assert len(calls) == 4 * blocks


def test_swapped_modules_keep_the_official_names(source):
    float_model = load_transformer(source, dtype=torch.float32)
    w8a8 = load_transformer(source, dtype=torch.float32, quant="int8-w8a8")
    weight_only = load_transformer(source, dtype=torch.float32, quant="int8")
    assert [n for n, _ in w8a8.named_modules()] == [n for n, _ in float_model.named_modules()]
    assert list(w8a8.state_dict()) == list(weight_only.state_dict())
    # weight-only layers get the workspace (scratch) but the modules stay the spec's own classes
    assert type(weight_only.blocks[0].attn) is Attention and type(weight_only.blocks[0].mlp) is SwiGLU
    assert weight_only.blocks[0].attn.wq.workspace is weight_only.kernel_workspace


def test_fused_swiglu_takes_the_fused_path_only_without_hooks(monkeypatch):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.mlp = SwiGLU(64, 256)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        float_out = holder.mlp(x)
    quantized(holder, ["mlp.down"], rotate=128)
    attach_workspace(holder, ["mlp.down"])
    mlp = holder.mlp
    assert type(mlp) is FusedSwiGLU and mlp.fused_down
    monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
    fused = spy(monkeypatch, aqt, "act_quant_triton")
    with torch.no_grad():
        plain = mlp(x)
        assert fused == [True] and rel_err(plain, float_out) < 0.03  # silu(gate)·up formed by the quantizer
        seen = []
        handle = mlp.down.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        hooked = mlp(x)
        handle.remove()
    assert fused == [True, False] and len(seen) == 1  # the hooked call went through forward()
    assert torch.equal(seen[0], torch.nn.functional.silu(mlp.gate(x)) * mlp.up(x))
    assert rel_err(hooked, plain) < 1e-3


def test_release_workspaces_frees_the_scratch(source):
    model = load_transformer(source, dtype=torch.float32, quant="int8")
    with torch.no_grad():
        model.kernel_workspace.scratch(torch.device("cpu"), torch.float32, 1000)
    assert release_workspaces(model, nn.Linear(2, 2), object()) == 4000
    assert model.kernel_workspace.nbytes == 0


def test_model_files_are_the_plain_spec():
    """No quantization, LoRA or hook logic in the model files: those live in quantize/, lora/, offload/."""
    root = Path(__file__).resolve().parents[2] / "krea2_lite" / "model"
    for name in ("transformer.py", "layers.py", "rope.py"):
        text = (root / name).read_text()
        found = re.findall(r"quant|lora|hook|workspace|forward_swiglu", text, flags=re.IGNORECASE)
        assert not found, f"{name} mentions {sorted(set(found))}"


# ---------------------------------------------------------------- GPU only
def test_gpu_weight_only_layers_dequantize_into_the_workspace(cuda_device, monkeypatch):
    """`auto` on CUDA: int8 weights are dequantized into the owner's scratch (sized by the largest
    layer), bit-identical to the plain path, and `release()` gives the memory back."""
    monkeypatch.setenv("KREA2_LITE_KERNELS", "auto")
    torch.manual_seed(0)
    holder = nn.Module()
    holder.a, holder.b = nn.Linear(256, 96), nn.Linear(96, 256)
    for name in ("a", "b"):
        setattr(holder, name, QuantizedLinear.from_linear(getattr(holder, name), "int8", None, torch.bfloat16))
    plain = [holder.a.to(cuda_device), holder.b.to(cuda_device)]
    x = torch.randn(5, 256, device=cuda_device, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = plain[1](plain[0](x))  # no workspace yet: fresh temporaries
        workspace = attach_workspace(holder, ["a", "b"])
        ours = holder.b(holder.a(x))
    assert torch.equal(ours, ref)
    assert workspace.nbytes == 256 * 96 * 2
    assert workspace.release() == 256 * 96 * 2 and workspace.nbytes == 0
