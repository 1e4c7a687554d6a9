"""Quantized matmul: the Triton dequant-matmul vs the plain-torch reference (interpreter on CPU).

Measured under the interpreter (relative L2 error vs `qmatmul_torch`): fp32 ≤ 3e-7, bf16 0 to
2e-8 (the kernel rounds the dequantized weight to bf16 exactly as the reference does). Bounds
stated with margin: fp32 1e-4 relative, bf16 2e-2 relative.
"""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import krea2_lite.kernels.qmatmul_triton as qmt
from krea2_lite import Krea2Config, kernels, load_transformer
from krea2_lite.kernels.qmatmul_torch import qmatmul_torch
from krea2_lite.kernels.qmatmul_triton import qmatmul_supports, qmatmul_triton
from krea2_lite.quantize import QuantizedLinear
from factories import diffusers_transformer, official_state_dict, random_inputs

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def layer(K, N, dtype, group, act, bias, seed=0):
    torch.manual_seed(seed)
    return QuantizedLinear.from_linear(nn.Linear(K, N, bias=bias), dtype, group, act)


def args_of(ql):
    return (ql.qdata, ql.scale, ql.shift, ql.dtype, ql.group, ql.out_features, ql.in_features, ql.bias)


def check(ql, M, act, seed=1):
    x = torch.randn(M, ql.in_features, generator=torch.Generator().manual_seed(seed)).to(act)
    ours = qmatmul_triton(x, *args_of(ql))
    ref = qmatmul_torch(x, *args_of(ql))
    assert ours.dtype == act and ours.shape == ref.shape
    assert torch.isfinite(ours).all()
    err = rel_err(ours, ref)
    assert err < TOL[act], err
    return err


# (M, K, N): single row, ragged M, K with a tail (96 = 64 + 32 under BLOCK_K 64), ragged N.
SHAPES = [(1, 64, 16), (17, 96, 48), (33, 128, 48)]


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_8bit_matches_reference(dtype, bias, act):
    for i, (M, K, N) in enumerate(SHAPES):
        check(layer(K, N, dtype, None, act, bias, seed=i), M, act)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_matches_reference(group, bias, act):
    shapes = [(M, K, N) for M, K, N in SHAPES if K % group == 0]  # quanto: group divides in_features
    assert shapes
    for i, (M, K, N) in enumerate(shapes):
        check(layer(K, N, "int4", group, act, bias, seed=i), M, act)


def test_int4_groups_straddling_rows_and_odd_group_count():
    """The layout allows groups across rows (g ∤ K) and an odd G (last packed row half-used)."""
    g = torch.Generator().manual_seed(3)
    N, K, group = 15, 40, 24  # N·K = 600 → G = 25 (odd), 24 ∤ 40
    G = N * K // group
    R = (G + 1) // 2
    qdata = torch.randint(0, 256, (R, group), dtype=torch.uint8, generator=g)
    scale = torch.rand(G, 1, generator=g) * 0.1 + 0.01
    shift = torch.randn(G, 1, generator=g) * 0.1
    bias = torch.randn(N, generator=g)
    x = torch.randn(9, K, generator=g)
    args = (qdata, scale, shift, "int4", group, N, K, bias)
    assert qmatmul_supports(x, *args) is None
    assert rel_err(qmatmul_triton(x, *args), qmatmul_torch(x, *args)) < 1e-5


def test_fp8_decodes_every_finite_code():
    """All 254 finite e4m3fn codes (incl. subnormals, ±0) through the bit decoder."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # drop the two NaNs
    N = codes.numel()  # 254: one weight row per code, K = 1 is too small for a dot → pad to 16
    qdata = torch.zeros(N, 16, dtype=torch.uint8)
    qdata[:, 0] = codes
    qdata = qdata.view(torch.float8_e4m3fn)
    scale = torch.ones(N, 1)
    x = torch.zeros(1, 16)
    x[0, 0] = 1.0
    ours = qmatmul_triton(x, qdata, scale, None, "fp8", None, N, 16)
    assert torch.equal(ours[0], qdata[:, 0].float())


def test_leading_dims_and_noncontiguous_x():
    ql = layer(64, 48, "int8", None, torch.float32, True)
    x = torch.randn(2, 3, 128)[..., ::2]  # (2, 3, 64), stride 2 along K
    assert rel_err(qmatmul_triton(x, *args_of(ql)), qmatmul_torch(x, *args_of(ql))) < 1e-5


def test_supports_reasons():
    ql = layer(64, 16, "int4", 32, torch.float32, False)
    x = torch.randn(3, 64)
    assert qmatmul_supports(x, *args_of(ql)) is None
    assert "in_features" in qmatmul_supports(torch.randn(3, 32), *args_of(ql))
    assert "activation dtype" in qmatmul_supports(x.double(), *args_of(ql))
    assert "qdata dtype" in qmatmul_supports(x, ql.qdata.to(torch.int8), *args_of(ql)[1:])
    with pytest.raises(ValueError, match="qmatmul_triton"):
        qmatmul_triton(x.double(), *args_of(ql))


def test_dispatch_and_module_forward(spy, monkeypatch):
    ql = layer(64, 48, "int4", 64, torch.float32, True)
    x = torch.randn(5, 64)
    calls = spy(qmt, "qmatmul_triton")
    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    ref = ql(x)
    assert not calls
    assert torch.allclose(ref, nn.functional.linear(x, ql.dequantize(), ql.bias), atol=1e-5)
    monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
    assert rel_err(ql(x), ref) < 1e-5 and calls
    assert rel_err(kernels.qmatmul(x, *args_of(ql)), ref) < 1e-5


# ---------------------------------------------------------------- whole (tiny) quantized model
CFG = Krea2Config.tiny(features=128, heads=4, kvheads=2, txtdim=64, txtheads=2, txtkvheads=2)


@pytest.mark.parametrize("dtype", ["int8", "fp8", "int4"])
def test_quantized_model_triton_equals_torch(source, dtype, monkeypatch, spy):
    model = load_transformer(source, dtype=torch.float32, quant=dtype)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    inputs = random_inputs(CFG, batch=1, txt_len=5, rows=4, cols=4)
    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    with torch.no_grad():
        ref = model(*inputs)
    calls = spy(qmt, "qmatmul_triton")
    monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
    with torch.no_grad():
        ours = model(*inputs)
    assert calls, "the Triton qmatmul was never called"
    err = rel_err(ours, ref)
    assert err < 1e-4, err


# ---------------------------------------------------------------- GPU only
@pytest.mark.parametrize("dtype,group", [("int8", None), ("fp8", None), ("int4", 128)])
def test_gpu_matches_reference(cuda_device, dtype, group):
    if qmt.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: the compiled kernel does not run")
    for act in (torch.bfloat16, torch.float16):
        ql = layer(640, 384, dtype, group, act, True).to(cuda_device)
        for M in (1, 77, 300):
            x = torch.randn(M, 640, device=cuda_device, dtype=act)
            err = rel_err(qmatmul_triton(x, *args_of(ql)), qmatmul_torch(x, *args_of(ql)))
            assert err < TOL[act], (act, M, err)
