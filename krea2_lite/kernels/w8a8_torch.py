"""Plain-torch W8A8 matmul: the reference for `w8a8_triton` and the stock-torch fast paths.

y (M, N) = (xq · sx) (wq · sw)ᵀ + bias, computed as acc · sx[m] · sw[n] + bias in fp32 (in that
order), then cast to `out_dtype`:
  int8  xq int8 (M, K), wq int8 (N, K); acc = exact int32 sum of products
        (`torch._int_mm` on CUDA when K, N are multiples of 8; float64 elsewhere — exact, because
        |acc| ≤ 127²·K < 2⁵³ — and far faster than `torch._int_mm` on the CPU)
  fp8   xq, wq float8_e4m3fn; acc = fp32 matmul of the decoded values
sx (M, 1) fp32 per token (from `act_quant_*`); sw (N, 1) per output channel (the layer's stored
scale, any float dtype); bias (N,) or None.

`scaled_mm_fp8` is the fp8 fast path through `torch._scaled_mm` with row-wise scales (fp8 tensor
cores, sm_89+; torch 2.13 also runs it on the CPU, which is how the tests check its argument
handling). `dequant_matmul` is the "dequantize both operands, then one bf16 GEMM" path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .act_quant_torch import act_quant_torch, rotate_blocks

W8A8_DTYPES = ("int8", "fp8")


def int8_mm_exact(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq (M, K) int8 · wq (N, K)ᵀ int8 → (M, N) int32, exact."""
    M, K = xq.shape
    N = wq.shape[0]
    if xq.is_cuda and K % 8 == 0 and N % 8 == 0 and K > 0:
        pad = max(0, 17 - M)  # cuBLASLt int8 GEMM needs more than 16 rows
        a = F.pad(xq, (0, 0, 0, pad)) if pad else xq
        return torch._int_mm(a, wq.t())[:M]
    return (xq.double() @ wq.double().t()).to(torch.int32)


def w8a8_epilogue(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """acc (M, N) · sx (M, 1) · sw[n] + bias[n] in fp32, cast to out_dtype."""
    y = acc.float()
    y.mul_(sx.float())
    y.mul_(sw.float().reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype)


# Output rows per GEMM call: bounds the int32 accumulator and its fp32 epilogue copy to
# ~64 MB each (16384-wide MLP layers at 4608 tokens would otherwise make 300 MB of each).
CHUNK_OUTPUTS = 1 << 24


def w8a8_matmul_torch(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(xq·sx)(wq·sw)ᵀ + bias → (M, N) out_dtype; int8 or fp8 operands (see the module docstring)."""
    if xq.dtype == torch.int8 and wq.dtype == torch.int8:
        gemm = int8_mm_exact
    elif xq.dtype == torch.float8_e4m3fn and wq.dtype == torch.float8_e4m3fn:
        def gemm(a, b):
            return a.float() @ b.float().t()
    else:
        raise ValueError(f"w8a8 operands must both be int8 or both float8_e4m3fn, got {xq.dtype} and {wq.dtype}")
    M, N = xq.shape[0], wq.shape[0]
    rows = max(256, CHUNK_OUTPUTS // max(N, 1))
    if M <= rows:
        return w8a8_epilogue(gemm(xq, wq), sx, sw, bias, out_dtype)
    y = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    for i in range(0, M, rows):
        y[i:i + rows] = w8a8_epilogue(gemm(xq[i:i + rows], wq), sx[i:i + rows], sw, bias, out_dtype)
    return y


def w8a8_linear_torch(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      act: str, rotate: int = 0) -> torch.Tensor:
    """A W8A8 layer in plain torch: x (..., K) → (..., N) in x.dtype.

    qdata (N, K) / scale (N, 1) are the stored weight (already W·H when rotate > 0); the
    activation is rotated by the same blocks, quantized per token to `act`, then multiplied.
    """
    xq, sx = act_quant_torch(x, act, rotate)
    y = w8a8_matmul_torch(xq, sx, qdata, scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], qdata.shape[0])


def scaled_mm_fp8(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8 W8A8 through `torch._scaled_mm` (row-wise scales, bias fused): same result as
    `w8a8_matmul_torch` up to the GEMM's accumulation order. wq (N, K) row-major is passed as
    the column-major (K, N) operand `_scaled_mm` wants. Needs K and N multiples of 16; row-wise
    scaling needs a bf16 output, so other output dtypes are computed in bf16 and cast.
    """
    N = wq.shape[0]
    mm_dtype = torch.bfloat16
    y = torch._scaled_mm(xq, wq.t(), scale_a=sx.float().contiguous(),
                         scale_b=sw.float().reshape(1, N).contiguous(), out_dtype=mm_dtype,
                         bias=None if bias is None else bias.to(mm_dtype))
    return y.to(out_dtype)


def scaled_mm_reason(xq: torch.Tensor, wq: torch.Tensor) -> str | None:
    """None if `scaled_mm_fp8` can take these operands, else why not."""
    K = xq.shape[1]
    N = wq.shape[0]
    if K % 16 or N % 16:
        return f"torch._scaled_mm needs K and N multiples of 16 (K={K}, N={N})"
    if xq.is_cuda and torch.cuda.get_device_capability(xq.device) < (8, 9):
        return "fp8 tensor cores need sm_89+"
    return None


def w8a8_matmul_dequant(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                        bias: torch.Tensor | None, out_dtype: torch.dtype,
                        weight_buffer: torch.Tensor | None = None) -> torch.Tensor:
    """(xq·sx)(wq·sw)ᵀ + bias as one GEMM in `out_dtype` (cuBLAS bf16/fp16 on a GPU): both operands
    dequantized, the weight into `weight_buffer` (a reused scratch tensor of ≥ N·K elements of
    out_dtype) or a fresh tensor. Differs from `w8a8_matmul_torch` by the rounding of both operands
    to out_dtype and the GEMM's accumulation order.
    """
    N, K = wq.shape
    xd = (xq.float() * sx).to(out_dtype)
    if weight_buffer is not None:
        w = weight_buffer.view(-1)[: N * K].view(N, K)
        w.copy_(wq)
        w.mul_(sw.to(out_dtype))
    else:
        w = (wq.float() * sw.float()).to(out_dtype)
    return F.linear(xd, w, None if bias is None else bias.to(out_dtype))


def dequant_matmul(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   act: str, rotate: int = 0, weight_buffer: torch.Tensor | None = None) -> torch.Tensor:
    """A W8A8 layer through one GEMM in x.dtype: the activation quantized per token (fake-quant),
    then `w8a8_matmul_dequant`. x (..., K) → (..., N)."""
    xq, sx = act_quant_torch(x, act, rotate)
    y = w8a8_matmul_dequant(xq, sx, qdata, scale, bias, x.dtype, weight_buffer)
    return y.reshape(*x.shape[:-1], qdata.shape[0])


def unrotate_weight(w: torch.Tensor, rotate: int) -> torch.Tensor:
    """The stored W·H back to W (H is symmetric and orthonormal, so H⁻¹ = H)."""
    return rotate_blocks(w, rotate) if rotate else w
