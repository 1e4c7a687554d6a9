"""W8A8: per-token activation quantizer, int8 GEMM, fp8 `_scaled_mm` wrapper, Hadamard rotation,
the dispatch, W8A8 QuantSpec / QuantizedLinear / folders. Triton under the interpreter on CPU.

Tolerances (vs the plain-torch references, fresh random inputs):
* quantizer without rotation: bit-identical codes and scales (same fp32 operations, IEEE division,
  round-half-even from floor, fp8 codes by integer RTNE);
* quantizer with rotation: the rotated sums may differ in the last fp32 bit (summation order), so
  scales agree to 1e-6 relative and at most 0.5% of the codes differ, by one step;
* int8 GEMM: bit-identical (exact int32 accumulation, the reference's fp32 epilogue order, bf16
  output rounded to nearest even), fp32 and bf16 outputs;
* fp8 `_scaled_mm` (bf16 out) vs the fp32 reference: 1e-2 relative;
* whole tiny W8A8 transformer, triton vs torch backends: 1e-3 relative (a code flipped by a last-bit
  difference in a rotated sum moves that token's contribution by one quantization step).
"""

import json
import logging

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import krea2_lite.kernels.act_quant_triton as aqt
import krea2_lite.kernels.w8a8_triton as wt
from krea2_lite import Krea2Config, kernels, load_transformer
from krea2_lite.kernels.act_quant_torch import act_quant_torch, hadamard_matrix, rotate_blocks
from krea2_lite.kernels.act_quant_triton import act_quant_supports, act_quant_triton
from krea2_lite.kernels.w8a8_torch import (dequant_matmul, int8_mm_exact, scaled_mm_fp8, w8a8_linear_torch,
                                           w8a8_matmul_torch)
from krea2_lite.kernels.w8a8_triton import w8a8_matmul_triton, w8a8_supports
from krea2_lite.quantize import QuantizedLinear, QuantSpec
from krea2_lite.files.quantized_folder import read_manifest, required_version
from factories import diffusers_transformer, official_state_dict, random_inputs


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def activations(M, K, act=torch.float32, seed=0, outliers=(5,), zero_row=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    for c in outliers:
        if c < K:
            x[:, c] *= 50
    if zero_row is not None and zero_row < M:
        x[zero_row] = 0
    return x.to(act)


# ---------------------------------------------------------------- Hadamard rotation
@pytest.mark.parametrize("n", [16, 64, 128, 256])
def test_hadamard_is_orthonormal_and_symmetric(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.t())
    assert set(hadamard_matrix(n, normalized=False).unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(n + 1 if n > 1 else 3)


def test_rotation_preserves_the_product():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 256, generator=g, dtype=torch.float64)
    w = torch.randn(40, 256, generator=g, dtype=torch.float64)
    for block in (16, 64, 128, 256):
        xr, wr = rotate_blocks(x, block), rotate_blocks(w, block)
        assert (xr @ wr.t() - x @ w.t()).abs().max() < 1e-10
        assert torch.allclose(rotate_blocks(xr, block), x, atol=1e-12)  # H·H = I
    with pytest.raises(ValueError, match="does not divide"):
        rotate_blocks(x[:, :200], 128)


def test_rotation_spreads_an_outlier_channel():
    x = activations(32, 256, outliers=(3, 77))
    q0, s0 = act_quant_torch(x, "int8")
    q1, s1 = act_quant_torch(x, "int8", rotate=128)
    err0 = rel_err(q0.float() * s0, x)
    err1 = rel_err(rotate_blocks(q1.float() * s1, 128), x)
    assert s1.mean() < 0.5 * s0.mean() and err1 < 0.5 * err0, (err0, err1)


# ---------------------------------------------------------------- activation quantizer
SHAPES_ACT = [(1, 64), (37, 192)]  # one row; ragged M (BLOCK_M 16) and a K tail (192 = 128 + 64)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rotate", [0, 64])
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_act_quant_matches_reference(dtype, rotate, act):
    for i, (M, K) in enumerate(SHAPES_ACT):
        x = activations(M, K, act, seed=i, zero_row=3)
        q, s = act_quant_triton(x, dtype, rotate)
        qr, sr = act_quant_torch(x, dtype, rotate)
        assert q.dtype == qr.dtype and q.shape == (M, K) and s.shape == (M, 1) and s.dtype == torch.float32
        if M > 3:
            assert s[3].item() == 1.0 and not q[3].float().any()  # a zero row
        if not rotate:
            assert torch.equal(s, sr)
            assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
            continue
        assert torch.allclose(s, sr, rtol=1e-6, atol=0)
        differ = q.float() != qr.float()
        assert differ.float().mean() <= 0.005
        if dtype == "int8":
            assert (q.float() - qr.float()).abs().max() <= 1
        assert rel_err(q.float() * s, qr.float() * sr) < 1e-3


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rotate", [0, 64])
def test_act_quant_fused_swiglu_matches_reference(rotate, act):
    """Quantizing silu(gate)·up in the kernel = forming the product in torch, then quantizing."""
    g = torch.Generator().manual_seed(6)
    gate = (torch.randn(2, 19, 192, generator=g) * 3).to(act)  # 38 rows: ragged; K tail without rotation
    up = torch.randn(2, 19, 192, generator=g).to(act)
    for dtype in ("int8", "fp8"):
        q, s = act_quant_triton(gate, dtype, rotate, up=up)
        qr, sr = act_quant_torch(gate, dtype, rotate, up=up)
        assert torch.equal(qr.view(torch.uint8), act_quant_torch(torch.nn.functional.silu(gate) * up, dtype,
                                                                  rotate)[0].view(torch.uint8))
        assert torch.allclose(s, sr, rtol=1e-6, atol=0)
        assert (q.float() != qr.float()).float().mean() <= 0.005
        assert rel_err(q.float() * s, qr.float() * sr) < 1e-3
    assert "does not match" in act_quant_supports(gate, "int8", 0, up[..., :64])


def test_act_quant_rounding_edge_cases():
    """Ties round to even (int8) and fp8 codes equal torch's cast over the whole range, subnormals included."""
    K = 16
    ties = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.49999997, 3.5, 4.5, 0, 0, 0, 0, 127]])
    q, s = act_quant_triton(ties, "int8")
    qr, sr = act_quant_torch(ties, "int8")
    assert s.item() == 1.0 and torch.equal(q, qr)
    assert q[0, :8].tolist() == [0, 2, 2, 0, -2, -2, 126, -126]
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(4000, generator=g) * 100, torch.randn(2000, generator=g) * 0.01,
                   torch.rand(2000, generator=g) * 0.03, torch.arange(-448, 449, 0.5)])
    v = torch.cat([v.clamp(-448, 448), torch.tensor([448.0])])
    v = torch.cat([v, torch.zeros((-v.numel()) % K)]).reshape(-1, K)
    v[:, 0] = 448.0  # scale 1 on every row: the values are encoded as they are
    q, s = act_quant_triton(v, "fp8")
    qr, _ = act_quant_torch(v, "fp8")
    assert torch.equal(s, torch.ones_like(s))
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


def test_act_quant_supports_reasons():
    x = torch.randn(3, 96)
    assert act_quant_supports(x, "int8", 32) is None
    assert "does not divide" in act_quant_supports(x, "int8", 64)
    assert "not in" in act_quant_supports(x, "int4")
    assert "activation dtype" in act_quant_supports(x.double())
    with pytest.raises(ValueError, match="act_quant_triton"):
        act_quant_triton(x, "int8", 64)


# ---------------------------------------------------------------- int8 GEMM and fp8 wrapper
SHAPES_MM = [(1, 64, 16), (37, 96, 48), (70, 160, 80)]  # one row; ragged M and N; K tail (96, 160 vs 64)


def quantized_operands(M, K, N, dtype="int8", seed=0, scale_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    xq, sx = act_quant_torch(torch.randn(M, K, generator=g), dtype)
    wq, sw = act_quant_torch(torch.randn(N, K, generator=g) * 0.02, dtype)
    bias = torch.randn(N, generator=g).to(scale_dtype)
    return xq, sx, wq, sw.to(scale_dtype), bias


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_int8_gemm_matches_reference(bias, out):
    for i, (M, K, N) in enumerate(SHAPES_MM):
        xq, sx, wq, sw, b = quantized_operands(M, K, N, seed=i)
        b = b if bias else None
        ours = w8a8_matmul_triton(xq, sx, wq, sw, b, out)
        ref = w8a8_matmul_torch(xq, sx, wq, sw, b, out)
        assert ours.dtype == out and ours.shape == (M, N)
        assert torch.equal(ours, ref), rel_err(ours, ref)


def test_int8_accumulation_is_exact():
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-127, 128, (9, 4096), dtype=torch.int8, generator=g)
    wq = torch.randint(-127, 128, (24, 4096), dtype=torch.int8, generator=g)
    xq[0] = 127
    wq[0] = 127  # 127²·4096 > 2²⁴: fp32 accumulation would not be exact
    exact = xq.long() @ wq.long().t()
    assert torch.equal(int8_mm_exact(xq, wq).long(), exact)
    assert torch.equal(torch._int_mm(xq[:, :64], wq[:, :64].t()).long(), xq[:, :64].long() @ wq[:, :64].long().t())


def test_reference_gemm_in_row_chunks(monkeypatch):
    """Large outputs are computed in row chunks (bounded int32 / fp32 temporaries): same result."""
    import krea2_lite.kernels.w8a8_torch as w8t

    for dtype in ("int8", "fp8"):
        xq, sx, wq, sw, b = quantized_operands(700, 64, 48, dtype)
        whole = w8a8_matmul_torch(xq, sx, wq, sw, b, torch.bfloat16)
        monkeypatch.setattr(w8t, "CHUNK_OUTPUTS", 48 * 300)  # 300 rows → 256 rows per chunk (the floor)
        assert torch.equal(w8a8_matmul_torch(xq, sx, wq, sw, b, torch.bfloat16), whole)
        monkeypatch.undo()


def test_w8a8_supports_reasons():
    xq, sx, wq, sw, b = quantized_operands(5, 64, 16)
    assert w8a8_supports(xq, sx, wq, sw, b, torch.bfloat16) is None
    assert "not both int8" in w8a8_supports(xq.float(), sx, wq, sw, b, torch.bfloat16)
    assert "sx must be" in w8a8_supports(xq, sx.double(), wq, sw, b, torch.bfloat16)
    assert "do not match" in w8a8_supports(xq[:, :32], sx, wq, sw, b, torch.bfloat16)
    with pytest.raises(ValueError, match="w8a8_matmul_triton"):
        w8a8_matmul_triton(xq, sx, wq, sw, b, torch.float64)


def test_scaled_mm_wrapper_matches_reference():
    """torch 2.13 runs `_scaled_mm` on the CPU: check the wrapper's operand layout, row-wise scales
    and bias handling against the fp32 reference (the kernel that matters runs on sm_89+)."""
    xq, sx, wq, sw, b = quantized_operands(32, 64, 48, "fp8")
    ref = w8a8_matmul_torch(xq, sx, wq, sw, b, torch.float32)
    try:
        ours = scaled_mm_fp8(xq, sx, wq, sw, b, torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm unavailable here: {exc}")
    assert ours.dtype == torch.float32 and rel_err(ours, ref) < 1e-2


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_dequant_matmul_path_matches_reference(act):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 128, generator=g)
    w = torch.randn(64, 128, generator=g) * 0.02
    wq, sw = act_quant_torch(w, act)
    bias = torch.randn(64, generator=g)
    ref = w8a8_linear_torch(x, wq, sw, bias, act, 64)
    scratch = torch.full((64 * 128 + 10,), float("nan"))
    assert rel_err(dequant_matmul(x, wq, sw, bias, act, 64, scratch), ref) < 1e-5
    assert rel_err(dequant_matmul(x, wq, sw, bias, act, 64), ref) < 1e-5


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_weight_only_scratch_path_is_bit_identical(dtype, act):
    """What `auto` runs for weight-only int8/fp8 on CUDA: dequantize into a reused buffer, then F.linear."""
    from krea2_lite.kernels.qmatmul_torch import qmatmul_scratch, qmatmul_torch

    torch.manual_seed(0)
    ql = QuantizedLinear.from_linear(nn.Linear(96, 40, bias=True), dtype, None, act)
    x = torch.randn(7, 96).to(act)
    buffer = torch.full((96 * 40 + 5,), float("nan"), dtype=act)
    ours = qmatmul_scratch(x, ql.qdata, ql.scale, dtype, 40, 96, ql.bias, buffer)
    ref = qmatmul_torch(x, ql.qdata, ql.scale, None, dtype, None, 40, 96, ql.bias)
    assert torch.equal(ours, ref)


# ---------------------------------------------------------------- the layer, the dispatch
def w8a8_layer(K, N, act, rotate, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    linear = nn.Linear(K, N, bias=bias)
    return linear, QuantizedLinear.from_linear(linear, act, None, dtype, activations=act, rotate=rotate)


@pytest.mark.parametrize("act,rotate", [("int8", 0), ("int8", 64), ("fp8", 0), ("fp8", 64)])
def test_w8a8_layer_error_and_dequantize(act, rotate):
    linear, ql = w8a8_layer(256, 96, act, rotate)
    x = activations(20, 256, seed=1, outliers=())
    with torch.no_grad():
        ref = linear(x)
        err = rel_err(ql(x), ref)
        assert err < {"int8": 0.02, "fp8": 0.08}[act], err
        assert rel_err(ql.dequantize(), linear.weight) < {"int8": 0.01, "fp8": 0.05}[act]  # un-rotated
    assert f"activations={act}" in repr(ql) and (f"rotate={rotate}" in repr(ql)) == bool(rotate)


def test_w8a8_layer_validation():
    with pytest.raises(ValueError, match="need int8 weights"):
        QuantizedLinear(64, 32, False, "fp8", None, activations="int8")
    with pytest.raises(ValueError, match="rotate=64 needs"):
        QuantizedLinear(96, 32, False, "int8", None, activations="int8", rotate=64)
    with pytest.raises(ValueError, match="rotate=64 needs"):
        QuantizedLinear(128, 32, False, "int8", None, rotate=64)


def test_w8a8_dispatch_backends(monkeypatch, caplog):
    _, ql = w8a8_layer(128, 48, "int8", 64)
    x = activations(2 * 9, 128, seed=2).reshape(2, 9, 128)
    calls = []
    for mod, name in ((aqt, "act_quant_triton"), (wt, "w8a8_matmul_triton")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    with torch.no_grad():
        monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
        ref = ql(x)
        monkeypatch.setenv("KREA2_LITE_KERNELS", "auto")  # CPU: the torch reference
        assert torch.equal(ql(x), ref)
        assert not calls
        monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
        ours = ql(x)
    assert calls == ["act_quant_triton", "w8a8_matmul_triton"]
    assert ours.shape == (2, 9, 48) and rel_err(ours, ref) < 1e-3
    assert torch.equal(ref, w8a8_linear_torch(x, ql.qdata, ql.scale, ql.bias, "int8", 64))
    # fp8 with the triton backend on the CPU: Triton quantizer, reference GEMM, one log line why
    _, q8 = w8a8_layer(128, 48, "fp8", 0)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="krea2_lite.kernels"):
        got = q8(x)
        monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
        assert rel_err(got, q8(x)) < 1e-6
    assert "fp8 W8A8 has no Triton GEMM" in caplog.text


def test_rotation_helps_with_outlier_channels():
    """Injected outlier channels (×50): the rotated int8 layer's error is several times smaller."""
    linear, plain = w8a8_layer(512, 128, "int8", 0, seed=3)
    _, rotated = w8a8_layer(512, 128, "int8", 128, seed=3)
    x = activations(64, 512, seed=4, outliers=(7, 100, 300, 301))
    with torch.no_grad():
        ref = linear(x)
        e_plain, e_rot = rel_err(plain(x), ref), rel_err(rotated(x), ref)
    assert e_rot < 0.5 * e_plain, (e_plain, e_rot)


# ---------------------------------------------------------------- QuantSpec
def test_quant_spec_w8a8_fields_and_shortcuts():
    assert QuantSpec.parse("int8-w8a8") == QuantSpec("int8", activations="int8")
    assert QuantSpec.parse("int8-w8a8-rot") == QuantSpec("int8", activations="int8", rotate=128)
    assert QuantSpec.parse("fp8-w8a8").activations == "fp8"
    assert QuantSpec("int8", activations="int8", rotate=True).rotate == 128
    assert QuantSpec("int8", activations="int8", rotate=64).name == "int8-w8a8-rot64"
    spec = QuantSpec("int8", activations="int8", rotate=128)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert "activations" not in QuantSpec("int8").to_dict()  # weight-only manifests unchanged
    # old manifests: no W8A8 fields; int4 ones were written with min-max rounding
    assert QuantSpec.from_dict({"dtype": "int4", "group_size": 64}) == QuantSpec("int4", 64, rounding="minmax")
    assert spec.rotate_for(6144) == 128 and spec.rotate_for(96) == 0
    for bad, match in ((dict(dtype="int4", activations="int8"), "one type"),
                       (dict(dtype="int8", activations="int4"), "activations must be"),
                       (dict(dtype="int8", rotate=128), "rotate needs W8A8"),
                       (dict(dtype="int8", activations="int8", rotate=100), "rotate must be")):
        with pytest.raises(ValueError, match=match):
            QuantSpec(**bad)


def test_text_encoder_spec_drops_w8a8():
    from krea2_lite.quantize.text_encoder import text_encoder_spec

    spec = text_encoder_spec("int8-w8a8-rot")
    assert spec.dtype == "int8" and spec.activations is None and spec.rotate == 0


# ---------------------------------------------------------------- whole (tiny) W8A8 model
CFG = Krea2Config.tiny(features=128, heads=4, kvheads=2, txtdim=64, txtheads=2, txtkvheads=2)


@pytest.fixture(scope="module")
def inputs():
    return random_inputs(CFG, batch=1, txt_len=5, rows=4, cols=4)


@pytest.mark.parametrize("quant", ["int8-w8a8", "int8-w8a8-rot", "fp8-w8a8"])
def test_w8a8_model_triton_equals_torch(source, inputs, quant, monkeypatch):
    model = load_transformer(source, dtype=torch.float32, quant=quant)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.activations == quant.split("-")[0] for m in layers)
    if quant.endswith("rot"):  # 128-wide blocks rotate; the 64-wide text refiner cannot
        assert {m.rotate for m in layers} == {0, 128}
    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    with torch.no_grad():
        ref = model(*inputs)
        fp32 = load_transformer(source, dtype=torch.float32)(*inputs)
    calls = []
    real = aqt.act_quant_triton
    monkeypatch.setattr(aqt, "act_quant_triton",
                        lambda *a, **k: calls.append(k.get("up") is not None) or real(*a, **k))
    monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
    with torch.no_grad():
        ours = model(*inputs)
    assert calls, "the Triton quantizer was never called"
    assert any(calls), "mlp.down never took the fused SwiGLU quantizer"
    assert rel_err(ours, ref) < 1e-3, rel_err(ours, ref)
    assert rel_err(ref, fp32) < {"int8": 0.05, "fp8": 0.15}[quant.split("-")[0]]


def test_rotated_w8a8_folder_round_trip(source, inputs, tmp_path, monkeypatch):
    from krea2_lite.cli.quantize import main as quantize_cli

    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    out = tmp_path / "q8rot"
    assert quantize_cli(["--model", str(source), "--dtype", "int8", "--activations", "int8", "--rotate",
                         "--out", str(out), "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest["format_version"] == 2
    assert (manifest["quant"]["activations"], manifest["quant"]["rotate"]) == ("int8", 128)
    qmap = json.loads((out / "transformer" / "quantization_map.json").read_text())
    assert {v["activations"] for v in qmap.values()} == {"none"}  # quanto's map: weights only
    # The CLI quantizes at bf16 (scales rounded to bf16 before the values): compare at bf16.
    reloaded = load_transformer(out, dtype=torch.bfloat16)
    on_the_fly = load_transformer(source, dtype=torch.bfloat16, quant="int8-w8a8-rot")
    assert reloaded.blocks[0].attn.wq.rotate == 128 and reloaded.blocks[0].attn.wq.activations == "int8"
    for name, module in on_the_fly.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.qdata, reloaded.get_submodule(name).qdata), name
    with torch.no_grad():
        assert torch.equal(reloaded(*inputs), on_the_fly(*inputs))
    with pytest.raises(ValueError, match="already quantized to int8-w8a8-rot128"):
        load_transformer(out, quant="int8")
    # W8A8 without rotation stays a version-1 folder (older readers run it weight-only, correctly)
    assert required_version({"quant": QuantSpec.parse("int8-w8a8").to_dict()}) == 1
    assert required_version({"quant": QuantSpec("int8").to_dict()}) == 1


# ---------------------------------------------------------------- GPU only
def test_gpu_kernels_match_reference(cuda_device):
    if aqt.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: the compiled kernels do not run")
    g = torch.Generator(device=cuda_device).manual_seed(0)
    for act in (torch.bfloat16, torch.float16):
        for M in (1, 77, 300):
            x = torch.randn(M, 640, device=cuda_device, generator=g).to(act)
            for rotate in (0, 128):
                q, s = act_quant_triton(x, "int8", rotate)
                qr, sr = act_quant_torch(x, "int8", rotate)
                assert torch.allclose(s, sr, rtol=1e-6) and (q.float() - qr.float()).abs().max() <= 1
            wq, sw = act_quant_torch(torch.randn(384, 640, device=cuda_device, generator=g) * 0.02, "int8")
            bias = torch.randn(384, device=cuda_device, generator=g).to(act)
            ours = w8a8_matmul_triton(qr, sr, wq, sw.to(act), bias, act)
            ref = w8a8_matmul_torch(qr, sr, wq, sw.to(act), bias, act)
            assert rel_err(ours, ref) < 1e-2


def test_gpu_scaled_mm_fp8(cuda_device):
    if torch.cuda.get_device_capability(cuda_device) < (8, 9):
        pytest.skip("fp8 tensor cores need sm_89+")
    g = torch.Generator(device=cuda_device).manual_seed(0)
    xq, sx = act_quant_torch(torch.randn(300, 640, device=cuda_device, generator=g), "fp8")
    wq, sw = act_quant_torch(torch.randn(384, 640, device=cuda_device, generator=g) * 0.02, "fp8")
    bias = torch.randn(384, device=cuda_device, generator=g).bfloat16()
    ref = w8a8_matmul_torch(xq, sx, wq, sw, bias, torch.bfloat16)
    assert rel_err(scaled_mm_fp8(xq, sx, wq, sw, bias, torch.bfloat16), ref) < 1e-2


def test_gpu_auto_dispatch(cuda_device, monkeypatch):
    monkeypatch.setenv("KREA2_LITE_KERNELS", "auto")
    for act in ("int8", "fp8"):
        linear, ql = w8a8_layer(640, 384, act, 128, dtype=torch.bfloat16)
        ql = ql.to(cuda_device)
        x = torch.randn(3, 100, 640, device=cuda_device, dtype=torch.bfloat16)
        with torch.no_grad():
            ref = linear.to(cuda_device).bfloat16()(x)
            assert rel_err(kernels.w8a8_linear(x, ql.qdata, ql.scale, ql.bias, act, 128), ref) < 0.08
