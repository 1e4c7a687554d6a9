"""Triton attention kernels vs. their torch references.

Without a GPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1),
so shapes are tiny. With a GPU the same tests run on CUDA. Tolerances:
  * fp32 kernel vs fp32 reference: atol = rtol = 1e-4;
  * bf16/fp16 kernel vs fp32 reference on the same (rounded) inputs: atol = rtol = 2e-2;
  * bf16/fp16 kernel vs the same-dtype torch reference: atol = rtol = 2e-2.
Rows whose keys are all masked are defined to be zeros (SDPA gives NaN there).
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from krea2_lite.kernels import dispatch
from krea2_lite.kernels.attention_triton import attention_triton, triton_supports
from krea2_lite.kernels.attention_torch import attention_torch
from krea2_lite.kernels.fused_attention_triton import fused_attention, fused_supports
from krea2_lite.kernels.fused_attention_torch import fused_attention_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
LOW_TOL = dict(atol=2e-2, rtol=2e-2)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_qkv(B, H, Hkv, L, D, dtype=torch.float32, seed=0):
    """q, k as non-contiguous (B, heads, L, D) views of (B, L, heads, D) tensors; v contiguous."""
    g = _gen(seed)
    q = torch.randn(B, L, H, D, generator=g).to(DEV, dtype).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D, generator=g).to(DEV, dtype).transpose(1, 2)
    v = torch.randn(B, Hkv, L, D, generator=g).to(DEV, dtype)
    return q, k, v


def make_mask(B, L, seed=0, p_keep=0.6):
    m = torch.rand(B, L, generator=_gen(seed + 100)) < p_keep
    m[torch.arange(B), torch.randint(0, L, (B,), generator=_gen(seed + 200))] = True  # >= 1 valid key
    return m.to(DEV)


# (B, H, Hkv, L, D): GQA ratios 1, 2, 3, 4, 6; lengths 1, 17, 45, 70 (interpreter tiles are 32)
SHAPES = [
    (1, 2, 2, 1, 64),
    (2, 4, 2, 17, 64),
    (1, 3, 1, 45, 128),
    (1, 4, 1, 70, 64),
    (1, 6, 1, 45, 64),
    (2, 6, 3, 33, 32),
    (1, 2, 1, 64, 64),  # a whole number of tiles: no ragged tail
]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}L{}D{}".format(*s))
def test_attention_fp32_matches_sdpa(shape, masked):
    B, H, Hkv, L, D = shape
    q, k, v = make_qkv(B, H, Hkv, L, D, seed=L + H)
    mask = make_mask(B, L, seed=L) if masked else None
    assert triton_supports(q, k, v, mask) is None
    out = attention_triton(q, k, v, mask)
    assert out.shape == (B, H, L, D) and out.dtype == torch.float32
    torch.testing.assert_close(out, attention_torch(q, k, v, mask), **FP32_TOL)


def test_attention_arbitrary_strides():
    B, H, Hkv, L, D = 2, 4, 2, 37, 64
    g = _gen(5)
    q = torch.randn(B, L, H, 2 * D, generator=g).to(DEV)[..., ::2].transpose(1, 2)  # last-dim stride 2
    kv = torch.randn(B, L, 2 * Hkv, D, generator=g).to(DEV)  # a fused kv projection
    k, v = kv[:, :, :Hkv].transpose(1, 2), kv[:, :, Hkv:].transpose(1, 2)
    mask = make_mask(B, 2 * L, seed=5)[:, ::2]  # non-contiguous mask too
    mask[:, 0] = True
    assert q.stride(-1) == 2 and not k.is_contiguous() and not mask.is_contiguous()
    torch.testing.assert_close(attention_triton(q, k, v, mask), attention_torch(q, k, v, mask), **FP32_TOL)


@pytest.mark.skipif(DEV == "cuda", reason="interpreter tile sizes only")
def test_attention_uneven_interpreter_tiles(monkeypatch):
    attn_mod = sys.modules["krea2_lite.kernels.attention_triton"]
    monkeypatch.setattr(attn_mod, "INTERPRET_BLOCK_M", 16)
    monkeypatch.setattr(attn_mod, "INTERPRET_BLOCK_N", 32)
    q, k, v = make_qkv(1, 3, 1, 50, 64, seed=9)
    mask = make_mask(1, 50, seed=9)
    torch.testing.assert_close(attention_triton(q, k, v, mask), attention_torch(q, k, v, mask), **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_low_precision(dtype):
    B, H, Hkv, L, D = 2, 6, 2, 45, 64
    q, k, v = make_qkv(B, H, Hkv, L, D, dtype=dtype, seed=3)
    mask = make_mask(B, L, seed=3)
    out = attention_triton(q, k, v, mask)
    assert out.dtype == dtype
    ref32 = attention_torch(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(out.float(), ref32, **LOW_TOL)
    torch.testing.assert_close(out, attention_torch(q, k, v, mask), **LOW_TOL)


def test_attention_all_masked_row_is_zero():
    B, H, Hkv, L, D = 2, 4, 2, 40, 64
    q, k, v = make_qkv(B, H, Hkv, L, D, seed=7)
    mask = make_mask(B, L, seed=7)
    mask[1] = False  # batch row 1: no valid key at all
    out = attention_triton(q, k, v, mask)
    assert not out.isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1], attention_torch(q[:1], k[:1], v[:1], mask[:1]), **FP32_TOL)


def test_triton_supports_reasons():
    q, k, v = make_qkv(1, 4, 2, 8, 64)
    assert triton_supports(q, k, v, None) is None
    assert "head dim" in triton_supports(*make_qkv(1, 4, 2, 8, 96), None)
    assert "multiple" in triton_supports(*make_qkv(1, 4, 3, 8, 64), None)
    assert "dtype" in triton_supports(q.double(), k.double(), v.double(), None)
    assert "length" in triton_supports(q, k[:, :, :4], v[:, :, :4], None)
    assert "key_mask" in triton_supports(q, k, v, torch.ones(1, 8, device=DEV))
    assert "key_mask" in triton_supports(q, k, v, torch.ones(1, 9, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="head dim"):
        attention_triton(*make_qkv(1, 4, 2, 8, 80))


# ---------------------------------------------------------------- fused Krea 2 attention
def make_fused_inputs(B, H, Hkv, L, D, dtype=torch.float32, seed=0, cos_batch=1, masked=True):
    g = _gen(seed)
    qkv = torch.randn(B, L, (H + 2 * Hkv) * D, generator=g).to(DEV, dtype)  # views, like the model
    q = qkv[..., : H * D].unflatten(-1, (H, D))
    k = qkv[..., H * D: (H + Hkv) * D].unflatten(-1, (Hkv, D))
    v = qkv[..., (H + Hkv) * D:].unflatten(-1, (Hkv, D))
    q_scale = (0.2 * torch.randn(D, generator=g)).to(DEV)
    k_scale = (0.2 * torch.randn(D, generator=g)).to(DEV)
    ang = (torch.rand(cos_batch, L, D // 2, generator=g) * 20).to(DEV)
    gate = torch.randn(B, L, H * D, generator=g).to(DEV, dtype)
    mask = make_mask(B, L, seed=seed) if masked else None
    return q, k, v, q_scale, k_scale, ang.cos(), ang.sin(), gate, mask


def independent_fused(q, k, v, q_scale, k_scale, cos, sin, gate, key_mask, eps=1e-5):
    """The unfused model path written differently: F.rms_norm and complex-number RoPE."""
    B, L, H, D = q.shape

    def norm_rope(x, scale):
        xn = (F.rms_norm(x.float(), (D,), eps=eps) * (1 + scale)).to(x.dtype)
        xc = torch.view_as_complex(xn.float().reshape(*x.shape[:-1], D // 2, 2).contiguous())
        rot = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, :, None, :]
        return torch.view_as_real(xc * rot).reshape(x.shape).to(x.dtype)

    o = attention_torch(norm_rope(q, q_scale).permute(0, 2, 1, 3), norm_rope(k, k_scale).permute(0, 2, 1, 3),
                        v.permute(0, 2, 1, 3), key_mask)
    o = o.permute(0, 2, 1, 3).reshape(B, L, H * D)
    return (o.float() * gate.float().sigmoid()).to(q.dtype)


FUSED_SHAPES = [  # (B, H, Hkv, L, D, cos_batch)
    (1, 2, 2, 1, 64, 1),
    (2, 4, 2, 17, 64, 2),
    (1, 3, 1, 45, 128, 1),
    (2, 6, 1, 33, 32, 1),
    (1, 4, 1, 70, 64, 1),
]


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "B{}H{}Hkv{}L{}D{}cosB{}".format(*s))
def test_fused_fp32_matches_reference(shape):
    B, H, Hkv, L, D, cb = shape
    args = make_fused_inputs(B, H, Hkv, L, D, seed=L + D, cos_batch=cb, masked=L > 1)
    assert fused_supports(*args) is None
    out = fused_attention(*args)
    assert out.shape == (B, L, H * D) and out.dtype == torch.float32
    torch.testing.assert_close(out, fused_attention_torch(*args), **FP32_TOL)


def test_fused_reference_matches_independent_composition():
    args = make_fused_inputs(2, 6, 2, 29, 64, seed=11, cos_batch=2)
    torch.testing.assert_close(fused_attention_torch(*args), independent_fused(*args), **FP32_TOL)
    args = make_fused_inputs(1, 4, 4, 20, 128, dtype=torch.bfloat16, seed=12)
    torch.testing.assert_close(fused_attention_torch(*args), independent_fused(*args), **LOW_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_low_precision(dtype):
    args = make_fused_inputs(2, 6, 2, 40, 64, dtype=dtype, seed=13)
    out = fused_attention(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out, fused_attention_torch(*args), **LOW_TOL)
    q, k, v, qs, ks, c, s, g, m = args
    ref32 = fused_attention_torch(q.float(), k.float(), v.float(), qs, ks, c, s, g.float(), m)
    torch.testing.assert_close(out.float(), ref32, **LOW_TOL)


def test_fused_all_masked_row_is_zero():
    q, k, v, qs, ks, c, s, g, m = make_fused_inputs(2, 4, 2, 24, 64, seed=14)
    m[0] = False
    out = fused_attention(q, k, v, qs, ks, c, s, g, m)
    ref = fused_attention_torch(q, k, v, qs, ks, c, s, g, m)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(ref[0], torch.zeros_like(ref[0]))
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_fused_supports_reasons():
    q, k, v, qs, ks, c, s, g, m = make_fused_inputs(1, 4, 2, 8, 64)
    assert fused_supports(q, k, v, qs, ks, c, s, g, m) is None
    assert "cos" in fused_supports(q, k, v, qs, ks, c[:, :4], s[:, :4], g, m)
    assert "gate" in fused_supports(q, k, v, qs, ks, c, s, g[..., :8], m)
    assert "q_scale" in fused_supports(q, k, v, qs[:8], ks, c, s, g, m)
    assert "multiple" in fused_supports(q, k[:, :, :1].expand(1, 8, 3, 64), v[:, :, :1].expand(1, 8, 3, 64),
                                        qs, ks, c, s, g, m)
    with pytest.raises(ValueError, match="gate"):
        fused_attention(q, k, v, qs, ks, c, s, g[..., :8], m)


# ---------------------------------------------------------------- dispatch
def test_attention_dispatch_backends(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 19, 64, seed=21)
    mask = make_mask(1, 19, seed=21)
    monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
    assert torch.equal(dispatch.attention(q, k, v, mask), attention_triton(q, k, v, mask))
    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    assert torch.equal(dispatch.attention(q, k, v, mask), attention_torch(q, k, v, mask))
    # Unsupported head dim under "triton": falls back to SDPA.
    q2, k2, v2 = make_qkv(1, 4, 2, 9, 48, seed=22)
    monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
    assert torch.equal(dispatch.attention(q2, k2, v2), attention_torch(q2, k2, v2))


def test_package_attention_stays_callable(monkeypatch):
    """The public `krea2_lite.kernels.attention` stays the dispatch function after the Triton
    kernel modules have been imported (no submodule may shadow it)."""
    import krea2_lite.kernels as kernels
    import krea2_lite.kernels.attention_triton  # noqa: F401
    import krea2_lite.kernels.fused_attention_triton  # noqa: F401

    assert kernels.attention is dispatch.attention

    q, k, v = make_qkv(1, 2, 1, 9, 64, seed=23)
    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    assert torch.equal(kernels.attention(q, k, v), attention_torch(q, k, v))


# ---------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_cuda_bf16_long_sequence(cuda_device):
    B, H, Hkv, L, D = 1, 8, 2, 1024, 128
    g = torch.Generator(device=cuda_device).manual_seed(0)
    q = torch.randn(B, L, H, D, device=cuda_device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D, device=cuda_device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, device=cuda_device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    mask = torch.rand(B, L, device=cuda_device, generator=g) < 0.9
    for m in (None, mask):
        torch.testing.assert_close(attention_triton(q, k, v, m), attention_torch(q, k, v, m), **LOW_TOL)
    gate = torch.randn(B, L, H * D, device=cuda_device, dtype=torch.bfloat16, generator=g)
    ang = torch.rand(1, L, D // 2, device=cuda_device, generator=g) * 50
    scales = 0.2 * torch.randn(2, D, device=cuda_device, generator=g)
    fargs = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scales[0], scales[1],
             ang.cos(), ang.sin(), gate, mask)
    torch.testing.assert_close(fused_attention(*fargs), fused_attention_torch(*fargs), **LOW_TOL)
