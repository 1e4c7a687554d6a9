"""Torch GGUF dequantization equals the `gguf` package's, bit for bit in float32, for every type."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from gguf_files import QUANT_TYPES, random_blocks
from krea2_lite.files.gguf_container import BLOCK_TYPES
from krea2_lite.kernels.gguf_dequant_torch import dequantize_gguf


@pytest.mark.parametrize("qtype", QUANT_TYPES)
@pytest.mark.parametrize("rows", [1, 7])
def test_random_blocks_match_the_package_bit_for_bit(qtype, rows):
    block = BLOCK_TYPES[qtype][0]
    cols = block * 3  # several blocks per row, an odd row count
    data = random_blocks(qtype, rows, cols, seed=rows)
    reference = dequantize(data, GGMLQuantizationType[qtype])
    ours = dequantize_gguf(torch.from_numpy(data), qtype, (rows, cols))
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (rows, cols)
    assert np.isfinite(reference).all()
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_package_quantized_weights_round_trip(qtype):
    w = np.random.default_rng(3).standard_normal((5, 96)).astype(np.float32)
    data = quantize(w, GGMLQuantizationType[qtype])
    ours = dequantize_gguf(torch.from_numpy(data), qtype, w.shape)
    np.testing.assert_array_equal(ours.numpy(), dequantize(data, GGMLQuantizationType[qtype]))
    assert np.abs(ours.numpy() - w).max() < 0.5  # a real quantization of w, not noise


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_types(qtype):
    w = torch.randn(3, 8)
    stored = w.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype])
    raw = stored.contiguous().view(torch.uint8)
    assert torch.equal(dequantize_gguf(raw, qtype, (3, 8)), stored.float())


def test_output_dtype():
    data = torch.from_numpy(random_blocks("Q4_K", 2, 256))
    out = dequantize_gguf(data, "Q4_K", (2, 256), torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize_gguf(data, "Q4_K", (2, 256)).to(torch.bfloat16))
