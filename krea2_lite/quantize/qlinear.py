"""A linear layer whose weight is stored quantized, in optimum-quanto's serialized layout.

optimum-quanto computes the quantization (its absmax optimizer for 8-bit types; for int4 the
scale/shift optimizer `rounding` names, see `int4_rounding`; then its `quantize_weight`, always
its kernel-agnostic tensors). The module keeps those tensors as plain buffers and does
its own matmul through `krea2_lite.kernels.qmatmul` (a Triton dequant-matmul, or the plain-torch
reference: dequantize, then `F.linear`). quanto's own CUDA paths (Marlin, AWQ, TinyGemm) are
avoided on purpose.

Layouts (w = the (out, in) float weight):
  int8  qdata int8 (out, in),          w = qdata · scale,          scale (out, 1)
  fp8   qdata float8_e4m3fn (out, in), w = qdata · scale,          scale (out, 1) = absmax/448
  int4  qdata uint8 (ceil(G/2), g),    w = q · scale − shift per group of g inputs;
        the weight is viewed row-major as (G, g), G = out·in/g, and q (0..15) is packed
        two rows per byte, not interleaved: qdata[r] = q[r] | q[r + ceil(G/2)] << 4.

W8A8 (`activations` = "int8" with int8 weights, "fp8" with fp8 weights): the same storage; the
forward quantizes x per token and multiplies 8-bit × 8-bit (`kernels.w8a8_linear`). With
`rotate` = b > 0 the stored weight is quantize(W·H), H = blockdiag(H_b/√b) over in_features
(symmetric, orthonormal), and the forward rotates x by H first: (x·H)(W·H)ᵀ = x·Wᵀ. The stored
tensors are still valid optimum-quanto tensors — of W·H, not W: quanto alone cannot run a
rotated layer (the folder's manifest records `rotate`; quanto's map only describes weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import kernels
from ..kernels.act_quant_torch import rotate_blocks
from ..kernels.qmatmul_torch import dequantize_weight
from .int4_rounding import DEFAULT_ROUNDING, check_rounding, int4_optimizer
from .w8a8_modules import attach_workspace

QUANTO_QTYPE_NAMES = {"int8": "qint8", "fp8": "qfloat8_e4m3fn", "int4": "qint4"}
STORAGE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}


def _quanto_qtype(dtype: str):
    from optimum.quanto import qfloat8_e4m3fn, qint4, qint8

    return {"int8": qint8, "fp8": qfloat8_e4m3fn, "int4": qint4}[dtype]


# Rows are quantized in slices of about this many elements: quanto's quantization makes several
# float32 temporaries of its input, so a whole 16384×6144 layer at once would cost ~1.6 GB.
CHUNK_ELEMENTS = 1 << 24


def _unpack_int4(packed) -> torch.Tensor:
    """quanto's 4-bit PackedTensor → its uint8 values (low nibbles are the first half of the rows).

    Done here in plain torch: `PackedTensor.unpack()` dispatches to quanto's C++ extension,
    which quanto compiles with ninja on first use (minutes, a compiler needed, and a lock file
    that a killed process leaves behind).
    """
    data = packed._data
    return torch.cat([data & 0xF, data >> 4])[: packed.shape[0]]


def _quantize_rows(w: torch.Tensor, dtype: str, group: int | None, scale_dtype: torch.dtype, rounding: str):
    """quanto on a slice of whole rows (float32) → (values, scale, shift); int4 values unpacked."""
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    qtype = _quanto_qtype(dtype)
    if dtype == "int4":
        scale, shift = int4_optimizer(rounding, scale_dtype)(w, qtype=qtype, axis=0, group_size=group)
        scale = scale.to(scale_dtype).float()
        shift = shift.to(scale_dtype).float()
        q = quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=group, optimized=False)
        return _unpack_int4(q._data), scale.to(scale_dtype), shift.to(scale_dtype)
    scale = AbsmaxOptimizer()(w, qtype=qtype, axis=0)
    # An all-zero row would give scale 0 and 0/0 values; any positive scale encodes it exactly.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(scale_dtype).float()
    q = quantize_weight(w, qtype=qtype, axis=0, scale=scale, optimized=False)
    return q._data, scale.to(scale_dtype), None


def quantize_weight_tensors(weight: torch.Tensor, dtype: str, group: int | None,
                            scale_dtype: torch.dtype, rotate: int = 0, rounding: str = DEFAULT_ROUNDING
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize an (out, in) weight with optimum-quanto → (qdata, scale, shift or None).

    Scales are rounded to `scale_dtype` *before* the values are quantized, so the stored scale
    is exactly the one the values were rounded against. Scales are per row (8-bit) or per
    group of whole rows' elements (int4), so slicing by rows gives quanto's exact result.
    `rotate` > 0 quantizes W·H instead (each row slice rotated in fp32 just before quantizing).
    `rounding` picks int4's scale and shift (`int4_rounding`: "mse-clip" or "minmax").
    """
    from optimum.quanto.tensor.packed import PackedTensor

    def rows_of(i: int, n: int) -> torch.Tensor:
        w = weight[i:i + n].detach().float()
        return rotate_blocks(w, rotate) if rotate else w

    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
    parts = [_quantize_rows(rows_of(i, rows), dtype, group, scale_dtype, rounding)
             for i in range(0, weight.shape[0], rows)]
    values = torch.cat([p[0] for p in parts])
    scale = torch.cat([p[1] for p in parts])
    if dtype == "int4":
        return PackedTensor.pack(values, bits=4)._data.contiguous(), scale, torch.cat([p[2] for p in parts])
    return values.contiguous(), scale, None


class QuantizedLinear(nn.Module):
    """y = x·Wᵀ + b with W quantized (int8 / fp8 per output channel, int4 group-wise);
    optionally W8A8 (`activations`, with an optional Hadamard `rotate` block)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, group: int | None,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None, activations: str | None = None,
                 rotate: int = 0, rounding: str = DEFAULT_ROUNDING):
        super().__init__()
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
        if activations is not None and activations != dtype:
            raise ValueError(f"W8A8 activations {activations!r} need {activations} weights, not {dtype!r}")
        if rotate and (activations is None or in_features % rotate):
            raise ValueError(f"rotate={rotate} needs W8A8 activations and in_features ({in_features}) divisible by it")
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.group = dtype, group
        self.activations, self.rotate = activations, int(rotate)
        self.rounding = check_rounding(rounding)  # how set_weight picks int4 scales; not stored
        if dtype == "int4":
            if group is None or (in_features * out_features) % group:
                raise ValueError(f"int4 needs a group size dividing the weight, got {group}")
            groups = in_features * out_features // group
            qshape, sshape = (math.ceil(groups / 2), group), (groups, 1)
        else:
            qshape, sshape = (out_features, in_features), (out_features, 1)
        self.register_buffer("qdata", torch.empty(qshape, dtype=STORAGE_DTYPES[dtype], device=device))
        self.register_buffer("scale", torch.empty(sshape, dtype=compute_dtype, device=device))
        self.register_buffer("shift", torch.empty(sshape, dtype=compute_dtype, device=device)
                             if dtype == "int4" else None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None
        # The model's KernelWorkspace (scratch, shared activation), given by `attach_workspace`;
        # None: each call allocates its own temporaries and quantizes its own input.
        self.workspace = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: str, group: int | None,
                    compute_dtype: torch.dtype | None = None, activations: str | None = None,
                    rotate: int = 0, rounding: str = DEFAULT_ROUNDING) -> "QuantizedLinear":
        compute_dtype = compute_dtype or linear.weight.dtype
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, group,
                     compute_dtype, device="meta", activations=activations, rotate=rotate, rounding=rounding)
        module.set_weight(linear.weight, linear.bias)
        return module

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantize `weight` (out, in) into this module's buffers (replacing them); rotated first
        when the layer rotates."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}")
        qdata, scale, shift = quantize_weight_tensors(weight, self.dtype, self.group, self.scale.dtype, self.rotate,
                                                      self.rounding)
        self.qdata, self.scale = qdata, scale
        if shift is not None:
            self.shift = shift
        if self.bias is not None:
            if bias is None:
                raise ValueError("this layer has a bias but none was given")
            self.bias = nn.Parameter(bias.detach().to(self.scale.dtype), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the stored values represent (rotated layers: un-rotated, W ≈ (W·H)_q·H)."""
        w = dequantize_weight(self.qdata, self.scale, self.shift, self.dtype, self.out_features,
                              self.in_features, torch.float32)
        return (rotate_blocks(w, self.rotate) if self.rotate else w).to(dtype)

    def forward_swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """self(F.silu(gate) * up); a W8A8 layer lets the Triton quantizer form the product in
        registers. A layer with hooks (a LoRA branch) takes the ordinary call: its hooks must see the
        product as their input."""
        if self.activations is None or self._forward_hooks or self._forward_pre_hooks:
            return self(torch.nn.functional.silu(gate) * up)
        return kernels.w8a8_linear(gate, self.qdata, self.scale, self.bias, self.activations, self.rotate, up=up,
                                   workspace=self.workspace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            return kernels.w8a8_linear(x, self.qdata, self.scale, self.bias, self.activations, self.rotate,
                                       workspace=self.workspace)
        return kernels.qmatmul(x, self.qdata, self.scale, self.shift, self.dtype, self.group,
                               self.out_features, self.in_features, self.bias, workspace=self.workspace)

    # ---- quanto's serialized names ---------------------------------------------------------
    def quanto_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """This layer's tensors under the keys optimum-quanto's QLinear.state_dict() uses."""
        data_key = "weight._data._data" if self.dtype == "int4" else "weight._data"
        state = {f"{prefix}{data_key}": self.qdata, f"{prefix}weight._scale": self.scale,
                 f"{prefix}input_scale": torch.ones((), dtype=torch.float32),
                 f"{prefix}output_scale": torch.ones((), dtype=torch.float32)}
        if self.shift is not None:
            state[f"{prefix}weight._shift"] = self.shift
        if self.bias is not None:
            state[f"{prefix}bias"] = self.bias.detach()
        return state

    @staticmethod
    def buffer_for_quanto_key(suffix: str) -> str | None:
        """Our buffer name for a quanto key suffix; None for quanto's unused activation scales."""
        return {"weight._data": "qdata", "weight._data._data": "qdata", "weight._scale": "scale",
                "weight._shift": "shift", "bias": "bias"}.get(suffix)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group else ""
        w8a8 = f", activations={self.activations}" if self.activations else ""
        rot = f", rotate={self.rotate}" if self.rotate else ""
        return (f"in={self.in_features}, out={self.out_features}, {self.dtype}{group}{w8a8}{rot}, "
                f"bias={self.bias is not None}")


def swap_linears(model: nn.Module, names: list[str], dtype: str, group_for, compute_dtype: torch.dtype,
                 activations: str | None = None, rotate_for=None, rounding: str = DEFAULT_ROUNDING) -> None:
    """Replace the named nn.Linear modules by empty QuantizedLinear ones (meta device), sharing the
    model's KernelWorkspace (W8A8: with the sharing attention / MLP modules, see `w8a8_modules`).
    `rotate_for(in_features)` gives a W8A8 layer's Hadamard block (0 = none)."""
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, leaf)
        rotate = rotate_for(linear.in_features) if rotate_for is not None else 0
        setattr(owner, leaf, QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                             dtype, group_for(linear.in_features), compute_dtype, device="meta",
                                             activations=activations, rotate=rotate, rounding=rounding))
    attach_workspace(model, names)
