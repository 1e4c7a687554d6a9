"""Byte counts for the memory planner: weights exactly, activations from the shapes of one step.

Weights are counted on a meta-device model built with the same code that loads the real one
(and, for a quantized model, the same quantized skeleton), so a byte here is a byte on the GPU.
Activations follow the live tensors of the widest point of a step; see `transformer_activation_bytes`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import Krea2Config

# Qwen3-VL-4B-Instruct's text path as Krea 2 uses it (layers 1..35, embedding table, no LM head).
QWEN3VL_4B_TEXT = dict(hidden=2560, intermediate=9728, heads=32, kvheads=8, headdim=128, vocab=151936, layers=35)
# Peak decoder activation per output pixel, in units of base_dim·itemsize: the last up-stage holds
# about eight full-resolution tensors of base_dim channels (1394 MiB measured untiled at 1024² bf16
# on an H100 for base_dim 96 → 7.3; 8 leaves a margin).
VAE_BYTES_PER_PIXEL_PER_CHANNEL = 8


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def pinned_size(nbytes: int) -> int:
    """Host bytes one pinned allocation of `nbytes` takes: PyTorch's CUDA caching host allocator rounds
    every request up to the next power of two (c10 PowerOf2Ceil in CachingHostAllocator)."""
    return 1 << max(0, nbytes - 1).bit_length() if nbytes > 0 else 0


def flat_size(sizes) -> int:
    """Bytes of one flat buffer holding tensors of these byte sizes, each at an ALIGN boundary
    (offload.tensor_slots.FlatLayout, the streamed blocks' host and device buffers)."""
    from .tensor_slots import ALIGN

    return sum(-(-n // ALIGN) * ALIGN for n in sizes)


def tensor_sizes(module: nn.Module, dtype: torch.dtype, prefix: str = "") -> list[int]:
    """Bytes of each tensor of `module` once loaded as krea2_lite loads it, counted on a meta copy.

    Quantized layers count their stored tensors as they are; float parameters count at `dtype`,
    except norm scales and modulation tables, which the loader keeps in float32.
    """
    from ..files.checkpoint import keeps_fp32
    from ..quantize.qlinear import QuantizedLinear

    out = []
    for name, sub in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(sub, QuantizedLinear) or getattr(sub, "stores_quantized", False):  # stored bytes (GGUF too)
            out += [t.numel() * t.element_size() for t in sub.buffers()]
            if sub.bias is not None:
                out.append(sub.bias.numel() * _itemsize(dtype))
            continue
        for pname, p in sub.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            out.append(p.numel() * (4 if keeps_fp32(full) else _itemsize(dtype)))
    return out


def module_bytes(module: nn.Module, dtype: torch.dtype, prefix: str = "") -> int:
    """Bytes `module` occupies once loaded (see `tensor_sizes`)."""
    return sum(tensor_sizes(module, dtype, prefix))


def module_pinned_bytes(module: nn.Module) -> int:
    """Host bytes a pinned copy of a loaded module takes, tensor by tensor (offload.swap.ModuleSwap)."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    return sum(pinned_size(t.numel() * t.element_size()) for t in tensors)


@dataclass(frozen=True)
class TransformerWeights:
    """Bytes of the transformer: what always stays on the device, and each block; and the host bytes of
    their pinned copies (each a power of two: see `pinned_size`)."""

    fixed: int  # everything outside `blocks` (embedders, text fusion, output layer)
    blocks: tuple[int, ...]
    largest_linear: int  # elements of the largest quantized weight (its bf16 dequantization scratch)
    pinned_streamed: tuple[int, ...] = ()  # per block: its flat pinned buffer when streamed
    pinned_swapped: tuple[int, ...] = ()  # per block: its tensors pinned one by one when the transformer swaps
    pinned_fixed: int = 0  # the fixed part's tensors pinned one by one

    @property
    def total(self) -> int:
        return self.fixed + sum(self.blocks)


@functools.lru_cache(maxsize=16)  # the pipeline re-plans per call shape; the weights don't change
def transformer_weights(config: Krea2Config, quant, dtype: torch.dtype) -> TransformerWeights:
    """Exact weight bytes of a Krea 2 transformer of shape `config`, quantized by `quant` or not."""
    from ..model import Krea2Transformer
    from ..quantize import QuantSpec
    from ..quantize.qlinear import QuantizedLinear
    from ..quantize.skeleton import build_quantized_skeleton

    spec = None if hasattr(quant, "skeleton") else QuantSpec.parse(quant)
    if hasattr(quant, "skeleton"):  # a community file kept as stored (quantize.gguf_linear.StoredFormat)
        model = quant.skeleton(config, dtype)
    elif spec is None:
        with torch.device("meta"):
            model = Krea2Transformer(config)
    else:
        model = build_quantized_skeleton(config, spec, dtype, log=False)
    per_block = [tensor_sizes(block, dtype, f"blocks.{i}.") for i, block in enumerate(model.blocks)]
    fixed = [n for name, child in model.named_children() if name != "blocks"
             for n in tensor_sizes(child, dtype, f"{name}.")]
    largest = max((m.in_features * m.out_features for m in model.modules()
                   if isinstance(m, QuantizedLinear) or getattr(m, "stores_quantized", False)),
                  default=0)
    return TransformerWeights(fixed=sum(fixed), blocks=tuple(sum(b) for b in per_block), largest_linear=largest,
                              pinned_streamed=tuple(pinned_size(flat_size(b)) for b in per_block),
                              pinned_swapped=tuple(sum(map(pinned_size, b)) for b in per_block),
                              pinned_fixed=sum(map(pinned_size, fixed)))


def transformer_activation_bytes(config: Krea2Config, batch: int, image_tokens: int, text_tokens: int,
                                 dtype: torch.dtype, quant=None) -> int:
    """Device bytes of activations at the widest point of one transformer forward.

    Counted (itemsize s, B batch, L = text + image tokens, f width, m MLP width):
      block MLP       x, its modulated norm, silu(gate·h), up·h and their product: B·L·s·(2f + 3m)
      block attention x, h, q, k, v, gate, attention out, wo out: B·L·s·(5f + 2·kvdim) + B·L·f·s
      norm            x plus the float32 input copy and output of RMSNorm: B·L·f·(s + 8)
      text fusion     the layerwise blocks see B·Ltxt sequences of `txtlayers` tokens: same MLP form
    plus what lives across the step (the stacked text context, latents, rope tables) and, for a
    quantized model, one dequantized weight (the largest: the reused scratch of the dequantize
    path); for W8A8 also the 8-bit copy of the widest layer input, its cached shared copy and the
    int32/fp32 GEMM row chunks (~64 MB each). Attention never materialises an L×L matrix
    (flash-style kernels, fused or SDPA). `quant`: None, a dtype string or a QuantSpec.
    """
    from ..quantize import QuantSpec

    spec = quant if hasattr(quant, "skeleton") else QuantSpec.parse(quant)
    s = _itemsize(dtype)
    f, m, kv = config.features, config.mlpdim, config.kvheads * config.headdim
    length = image_tokens + text_tokens
    tokens = batch * length
    mlp = tokens * s * (2 * f + 3 * m)
    attention = tokens * s * (6 * f + 2 * kv)
    norm = tokens * f * (s + 8)
    txt_tokens = batch * text_tokens * config.txtlayers
    fusion = txt_tokens * s * (2 * config.txtdim + 3 * config.txtmlpdim)
    persistent = (batch * text_tokens * config.txtlayers * config.txtdim * s  # stacked context
                  + batch * image_tokens * config.in_channels * 4 * 3  # latents, velocity, next latents
                  + length * config.headdim * 4)  # rope cos/sin, float32
    scratch = 0
    if spec is not None:
        scratch = m * f * s  # the largest dequantized weight (MLP up / gate / down)
        scratch += tokens * spec.lowrank * s  # int4-lr: the branch's (tokens, rank) intermediate
        if spec.activations is not None:
            scratch += 2 * tokens * m + 2 * (64 << 20)  # int8 input copies (shared + widest) and GEMM chunks
    return max(mlp, attention, norm, fusion) + persistent + scratch


def text_encoder_weight_bytes(dtype: torch.dtype, shape: dict | None = None) -> int:
    """Bytes of the Qwen3-VL text path (embedding + tapped layers) at `dtype`, unquantized."""
    c = shape or QWEN3VL_4B_TEXT
    h, inter, hd = c["hidden"], c["intermediate"], c["headdim"]
    per_layer = (h * c["heads"] * hd * 2 + h * c["kvheads"] * hd * 2  # q, o / k, v
                 + 3 * h * inter + 2 * h + 2 * hd)  # MLP, the two norms, q/k norms
    return (c["vocab"] * h + c["layers"] * per_layer) * _itemsize(dtype)


def text_encoder_pinned_bytes(dtype: torch.dtype, shape: dict | None = None) -> int:
    """Host bytes of a pinned copy of the text path (`text_encoder_weight_bytes`'s tensors), each
    tensor rounded up by the caching host allocator (see `pinned_size`)."""
    c = shape or QWEN3VL_4B_TEXT
    h, inter, hd, s = c["hidden"], c["intermediate"], c["headdim"], _itemsize(dtype)
    layer = [h * c["heads"] * hd] * 2 + [h * c["kvheads"] * hd] * 2 + [h * inter] * 3 + [h] * 2 + [hd] * 2
    return pinned_size(c["vocab"] * h * s) + c["layers"] * sum(pinned_size(n * s) for n in layer)


def text_encoder_largest_tensor_bytes(dtype: torch.dtype, shape: dict | None = None) -> int:
    """The largest single tensor of the text path (the embedding table): what a loader holds in flight
    when it reads the encoder tensor by tensor onto the device."""
    c = shape or QWEN3VL_4B_TEXT
    return max(c["vocab"] * c["hidden"], c["hidden"] * c["intermediate"]) * _itemsize(dtype)


def text_encoder_activation_bytes(batch: int, tokens: int, dtype: torch.dtype, taps: int = 12,
                                  shape: dict | None = None, quantized: bool = False) -> int:
    """Encoding `batch` prompts of `tokens` tokens: layer activations, the attention matrix, the taps;
    for a `quantized` encoder also the dequantization scratch of its largest weight (an MLP matrix,
    the KernelWorkspace buffer every quantized layer reuses)."""
    c = shape or QWEN3VL_4B_TEXT
    s = _itemsize(dtype)
    layer = batch * tokens * s * (4 * c["hidden"] + 3 * c["intermediate"])
    attention = batch * c["heads"] * tokens * tokens * 4
    scratch = c["hidden"] * c["intermediate"] * s if quantized else 0
    return layer + attention + taps * batch * tokens * c["hidden"] * s + scratch


def vae_activation_bytes(base_dim: int, height: int, width: int, batch: int, dtype: torch.dtype,
                         tile_pixels: int | None) -> int:
    """Decoder activations for `batch` images of height×width pixels, whole or in square tiles."""
    s = _itemsize(dtype)
    per_pixel = VAE_BYTES_PER_PIXEL_PER_CHANNEL * base_dim * s
    if tile_pixels is None:
        return batch * height * width * per_pixel
    tile_area = min(tile_pixels, height) * min(tile_pixels, width)
    accumulator = batch * 3 * height * width * 4  # float32 blend target
    return batch * tile_area * per_pixel + accumulator + batch * 3 * height * width * s


def vae_weight_bytes(dtype: torch.dtype, config=None) -> int:
    """Bytes of the 2D VAE decoder krea2_lite builds (default: the Qwen-Image shape), counted on meta."""
    from ..model.vae import QwenImageVAEDecoder

    with torch.device("meta"):
        decoder = QwenImageVAEDecoder(config)
    return sum(t.numel() for t in decoder.parameters()) * _itemsize(dtype)


# Peak encoder activation per input pixel, in units of base_dim·itemsize: a full-resolution residual
# block holds its input, the normalised copy and the first conv's output (plus the shortcut) of
# base_dim channels. Measured on the CPU (fp32, 1024², untiled): 2066 MiB of RSS growth → 5.4; 6
# leaves a margin. Not yet measured on a GPU (the GPU proof's `vae` section records it).
VAE_ENCODER_BYTES_PER_PIXEL_PER_CHANNEL = 6


def vae_encoder_activation_bytes(base_dim: int, height: int, width: int, batch: int, dtype: torch.dtype,
                                 tile_pixels: int | None) -> int:
    """Encoder activations for `batch` images of height×width pixels, whole or in square tiles
    (tiled: one tile's activations + the whole input image + the float32 latent accumulator)."""
    s = _itemsize(dtype)
    per_pixel = VAE_ENCODER_BYTES_PER_PIXEL_PER_CHANNEL * base_dim * s
    image = batch * 3 * height * width * s
    if tile_pixels is None:
        return batch * height * width * per_pixel + image
    tile_area = min(tile_pixels, height) * min(tile_pixels, width)
    accumulator = batch * 16 * (height // 8) * (width // 8) * 4
    return batch * tile_area * per_pixel + image + accumulator


def vae_encoder_weight_bytes(dtype: torch.dtype, config=None) -> int:
    """Bytes of the 2D VAE encoder krea2_lite builds (default: the Qwen-Image shape), counted on meta."""
    from ..model.vae_encoder import QwenImageVAEEncoder

    with torch.device("meta"):
        encoder = QwenImageVAEEncoder(config)
    return sum(t.numel() for t in encoder.parameters()) * _itemsize(dtype)
