"""The Triton GGUF dequant-matmul (Q8_0, Q4_K) against its torch reference, under the interpreter
on CPU (small shapes: ragged M and N, several blocks along K, bias, each activation dtype)."""

import pytest
import torch

from gguf_files import random_blocks
from krea2_lite import kernels
from krea2_lite.kernels.gguf_dequant_torch import gguf_linear_torch
from krea2_lite.kernels.gguf_triton import gguf_matmul_supports, gguf_matmul_triton

SHAPES = {"Q8_0": (5, 40, 96), "Q4_K": (3, 33, 512)}  # M, N, K


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_torch_reference(qtype, dtype):
    m, n, k = SHAPES[qtype]
    qdata = torch.from_numpy(random_blocks(qtype, n, k, seed=n, scale=0.05))
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    assert gguf_matmul_supports(x, qdata, qtype, n, k, bias) is None
    ours = gguf_matmul_triton(x, qdata, qtype, n, k, bias).float()
    ref = gguf_linear_torch(x, qdata, qtype, n, k, bias).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_dispatch_picks_it_when_asked(monkeypatch, spy):
    from krea2_lite.kernels import gguf_triton

    calls = spy(gguf_triton, "gguf_matmul_triton")
    monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
    qdata = torch.from_numpy(random_blocks("Q8_0", 16, 64))
    x = torch.randn(2, 64)
    y = kernels.gguf_linear(x, qdata, "Q8_0", 16, 64)
    assert calls and torch.allclose(y, gguf_linear_torch(x, qdata, "Q8_0", 16, 64), rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("KREA2_LITE_KERNELS", "torch")
    kernels.gguf_linear(x, qdata, "Q8_0", 16, 64)
    assert len(calls) == 1  # the torch backend never calls the kernel
    qdata5 = torch.from_numpy(random_blocks("Q5_0", 16, 64))
    monkeypatch.setenv("KREA2_LITE_KERNELS", "triton")
    kernels.gguf_linear(x, qdata5, "Q5_0", 16, 64)  # no kernel for Q5_0: the reference runs
    assert len(calls) == 1
