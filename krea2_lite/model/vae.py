"""The Qwen-Image VAE decoder (used by Krea 2), rebuilt as a single-frame 2D network.

The released VAE (diffusers ``AutoencoderKLQwenImage``) is a causal *video* VAE.  An image is one
frame (T=1), and for one frame the video machinery collapses exactly:

* a causal 3D conv pads two zero frames in front, so only the kernel's last temporal slice ever
  meets data: it is a 2D conv with ``weight[:, :, -1]`` (converted when the weights are loaded);
* the ``upsample3d`` resamplers skip their ``time_conv`` on the first frame (the feature cache
  holds ``"Rep"``), so they are nearest-exact 2x + 3x3 conv, like ``upsample2d``; ``time_conv``
  weights are never read;
* the feature cache, the per-frame loop and the chunking do nothing else for T=1.

What is left: ``post_quant_conv`` (1x1) -> ``conv_in`` -> mid block (res, single-head attention
with head dim = channels, res) -> up blocks (``num_res_blocks + 1`` residual blocks, then a 2x
upsampler on all but the last) -> RMS norm -> SiLU -> ``conv_out`` -> clamp to [-1, 1].

Parameter names equal diffusers' state-dict keys (``decoder.conv_in.weight`` ...), so weights
stream in by name (``krea2_lite.loading.vae.load_vae_decoder``).  The encoder and ``quant_conv`` are
neither built nor read.  This module never imports diffusers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "QwenImageVAEConfig",
    "QwenImageVAEDecoder",
    "tile_spans",
]

# Default tiling (in latents): a 64-latent tile is 512 px, overlapping its neighbours by 16 latents.
DEFAULT_TILE = 64
# tile="auto" tiles only images with more latents than this (128 x 128 latents = 1024 x 1024 px).
DEFAULT_AUTO_TILE_AREA = 128 * 128
# The half-precision RMS norm upcasts to float32; it does so this many elements at a time.
_NORM_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QwenImageVAEConfig:
    """The fields of diffusers ``AutoencoderKLQwenImage``'s config.json, with its defaults."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        for name in ("base_dim", "z_dim", "num_res_blocks", "input_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not self.dim_mult or any(not isinstance(m, int) or m <= 0 for m in self.dim_mult):
            problems.append(f"dim_mult must be positive ints, got {list(self.dim_mult)}")
        if len(self.temperal_downsample) < len(self.dim_mult) - 1:
            problems.append(f"temperal_downsample needs {len(self.dim_mult) - 1} entries, "
                            f"got {list(self.temperal_downsample)}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                problems.append(f"{name} has {len(getattr(self, name))} entries, z_dim is {self.z_dim}")
        if any(not s for s in self.latents_std):
            problems.append("latents_std has a zero entry")
        for name in ("latents_mean", "latents_std"):  # a NaN/inf here decodes every image to black
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                   for v in getattr(self, name)):
                problems.append(f"{name} must hold finite numbers, got {list(getattr(self, name))}")
        if isinstance(self.base_dim, int) and self.base_dim % 2:
            problems.append(f"base_dim={self.base_dim} must be even (the upsamplers halve channels)")
        if problems:
            raise ValueError("invalid QwenImageVAEConfig: " + "; ".join(problems))

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent along each side (8 for the released VAE)."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QwenImageVAEConfig":
        """Keep the known fields; ignore diffusers' bookkeeping (``_class_name`` ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------------------------
# layers (2D, single frame)
# --------------------------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    """``F.normalize(x, dim=1) * sqrt(C) * gamma`` (diffusers ``QwenImageRMS_norm``, no bias).

    Half-precision inputs are normalised in float32, like diffusers; here the upcast is done a slab
    of rows at a time so it never holds a float32 copy of a whole activation.  Same arithmetic, so
    the same bits.
    """

    def __init__(self, dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.dim = dim
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            out = torch.empty_like(x)
            h = x.shape[-2]
            rows = max(1, _NORM_CHUNK_ELEMENTS // max(1, x.numel() // max(h, 1)))
            for r0 in range(0, h, rows):
                out[..., r0:r0 + rows, :] = F.normalize(x[..., r0:r0 + rows, :].float(), dim=1)
        else:
            out = F.normalize(x, dim=1)
        # (normalized * scale) * gamma, evaluated in place: diffusers' order, so diffusers' rounding.
        return out.mul_(self.scale).mul_(self.gamma)


class _ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.norm1 = _RMSNorm(in_dim, dtype)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1, dtype=dtype)
        self.norm2 = _RMSNorm(out_dim, dtype)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, dtype=dtype)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1, dtype=dtype) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_shortcut(x)
        y = self.conv1(F.silu(self.norm1(x), inplace=True))
        y = self.conv2(F.silu(self.norm2(y), inplace=True))  # dropout: identity at inference
        return y.add_(h)


class _AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels; head dim = channels."""

    def __init__(self, dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.dim = dim
        self.norm = _RMSNorm(dim, dtype)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1, dtype=dtype)
        self.proj = nn.Conv2d(dim, dim, 1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x))
        qkv = qkv.reshape(b, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        del qkv
        out = F.scaled_dot_product_attention(q, k, v)
        del q, k, v
        out = out.squeeze(1).permute(0, 2, 1).reshape(b, c, h, w)
        return self.proj(out).add_(x)


class _Upsample2x(nn.Module):
    """Nearest-exact 2x (a pure copy, so done in the input dtype: same values as diffusers' float32 detour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class _Resample(nn.Module):
    """``upsample2d`` / ``upsample3d`` for one frame: nearest-exact 2x then a 3x3 conv halving channels.

    ``resample.1`` keeps diffusers' key names; ``upsample3d``'s ``time_conv`` never runs for one frame.
    """

    def __init__(self, dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.resample = nn.Sequential(_Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class _MidBlock(nn.Module):
    def __init__(self, dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.attentions = nn.ModuleList([_AttentionBlock(dim, dtype)])
        self.resnets = nn.ModuleList([_ResidualBlock(dim, dim, dtype), _ResidualBlock(dim, dim, dtype)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x))
        return x


class _UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: bool,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([_ResidualBlock(a, b, dtype) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = nn.ModuleList([_Resample(out_dim, dtype)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class _Decoder2d(nn.Module):
    """diffusers ``QwenImageDecoder3d`` for one frame (attribute names kept for the state dict)."""

    def __init__(self, cfg: QwenImageVAEConfig, dtype: torch.dtype | None = None):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1, dtype=dtype)
        self.mid_block = _MidBlock(dims[0], dtype)
        self.up_blocks = nn.ModuleList()
        n = len(cfg.dim_mult)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous block's upsampler halved the channels
            self.up_blocks.append(_UpBlock(in_dim, out_dim, cfg.num_res_blocks, upsample=i != n - 1, dtype=dtype))
        self.norm_out = _RMSNorm(dims[-1], dtype)
        self.conv_out = nn.Conv2d(dims[-1], cfg.input_channels, 3, padding=1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


# --------------------------------------------------------------------------------------------
# tiling helpers
# --------------------------------------------------------------------------------------------
def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover ``[0, size)`` with the fewest windows of at most ``tile`` overlapping by >= ``overlap``.

    The windows share one length (``tile`` or a little less, so no compute goes to needlessly wide
    overlaps) and are spread evenly from edge to edge; overlaps exceed ``overlap`` by at most 1.
    """
    if size <= tile:
        return [(0, size)]
    n = -(-(size - overlap) // (tile - overlap))
    length = -(-(size + (n - 1) * overlap) // n)
    starts = [k * (size - length) // (n - 1) for k in range(n)]
    return [(s, s + length) for s in starts]


def _blend_weights(spans: Sequence[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """Per-window 1D weights (pixel space, float32) that ramp linearly across each overlap and
    sum to exactly 1 at every pixel."""
    px = [(a * scale, b * scale) for a, b in spans]
    ws = []
    for k, (a, b) in enumerate(px):
        pos = torch.arange(a, b, dtype=torch.float64) + 0.5
        w = torch.ones(b - a, dtype=torch.float64)
        if k > 0 and px[k - 1][1] > a:  # ramp up across the overlap with the previous window
            w = torch.minimum(w, (pos - a) / (px[k - 1][1] - a))
        if k + 1 < len(px) and px[k + 1][0] < b:  # ramp down across the overlap with the next one
            w = torch.minimum(w, (b - pos) / (b - px[k + 1][0]))
        ws.append(w)
    total = torch.zeros(px[-1][1], dtype=torch.float64)
    for (a, b), w in zip(px, ws):
        total[a:b] += w
    return [(w / total[a:b]).float() for (a, b), w in zip(px, ws)]


# --------------------------------------------------------------------------------------------
# the decoder
# --------------------------------------------------------------------------------------------
class QwenImageVAEDecoder(nn.Module):
    """Qwen-Image VAE decoder for images: ``post_quant_conv`` + ``decoder.*``, 2D convs only.

    ``decode(latents)`` takes the normalised latents the Krea 2 transformer works in, shape
    (B, z_dim, h, w) or (B, z_dim, 1, h, w), and returns images in [-1, 1], (B, 3, 8h, 8w).
    """

    def __init__(self, config: QwenImageVAEConfig | None = None, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config if config is not None else QwenImageVAEConfig()
        self.post_quant_conv = nn.Conv2d(self.config.z_dim, self.config.z_dim, 1, dtype=dtype)
        self.decoder = _Decoder2d(self.config, dtype)
        self.auto_tile_area = DEFAULT_AUTO_TILE_AREA
        self.auto_tile = DEFAULT_TILE

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def spatial_scale(self) -> int:
        return self.config.spatial_scale

    def use_channels_last(self) -> "QwenImageVAEDecoder":
        """Store the conv kernels channels-last (NHWC); returns self.

        On CPUs without native bf16 (AVX2), PyTorch runs NCHW bf16/fp16 convolutions on a slow
        fallback (~100x slower than fp32); with channels-last kernels oneDNN takes them (~3x fp32).
        :func:`krea2_lite.loading.vae.load_vae_decoder` does this for half precision on CPU.
        """
        return self.to(memory_format=torch.channels_last)

    # ---- latent normalisation -----------------------------------------------------------
    def unnormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Transformer space -> VAE space, with diffusers Krea2Pipeline's arithmetic:
        ``latents / (1 / std) + mean``, the statistics made in float32 then cast to the latents' dtype."""
        shape = (1, self.config.z_dim) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = (1.0 / torch.tensor(self.config.latents_std).view(shape)).to(latents.device, latents.dtype)
        return latents / inv_std + mean

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE space -> transformer space (inverse of :meth:`unnormalize_latents`)."""
        shape = (1, self.config.z_dim) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = (1.0 / torch.tensor(self.config.latents_std).view(shape)).to(latents.device, latents.dtype)
        return (latents - mean) * inv_std

    # ---- decoding -----------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Untiled raw decode of VAE-space latents (B, z_dim, h, w), clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(z)).clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, tile: int | str | None = None,
               tile_overlap: int | None = None) -> torch.Tensor:
        """Normalised (transformer-space) latents -> images in [-1, 1], (B, 3, 8h, 8w).

        Accepts (B, z_dim, h, w) or the pipeline's unpacked (B, z_dim, 1, h, w).  ``tile``: None
        (whole image at once), an int maximum latent tile side, or "auto" (tiles of
        ``self.auto_tile`` only when h*w > ``self.auto_tile_area``).  ``tile_overlap`` in latents,
        default tile // 4; seams are blended linearly in pixel space (see :func:`tile_spans`).
        Tiles are decoded one at a time into a float32 accumulator, so activation memory follows
        the tile size, not the image size.  Tiling is approximate (the decoder sees past a tile).
        """
        z = self._as_4d(latents).to(self.device, self.dtype)
        return self.decode_raw(self.unnormalize_latents(z), tile=tile, tile_overlap=tile_overlap)

    @torch.no_grad()
    def decode_raw(self, z: torch.Tensor, *, tile: int | str | None = None,
                   tile_overlap: int | None = None) -> torch.Tensor:
        """VAE-space latents -> images: diffusers ``vae.decode(z[:, :, None])[0][:, :, 0]``."""
        z = self._as_4d(z).to(self.device, self.dtype)
        h, w = z.shape[-2:]
        tile, tile_overlap = self._resolve_tiling(h, w, tile, tile_overlap)
        if tile is None:
            return self(z)
        ys, xs = tile_spans(h, tile, tile_overlap), tile_spans(w, tile, tile_overlap)
        if len(ys) == 1 and len(xs) == 1:
            return self(z)
        return self._tiled(z, ys, xs)

    def _tiled(self, z: torch.Tensor, ys: list[tuple[int, int]], xs: list[tuple[int, int]]) -> torch.Tensor:
        s = self.spatial_scale
        b, _, h, w = z.shape
        wy = [t.to(z.device) for t in _blend_weights(ys, s)]
        wx = [t.to(z.device) for t in _blend_weights(xs, s)]
        out = None
        for (y0, y1), wyk in zip(ys, wy):
            for (x0, x1), wxk in zip(xs, wx):
                img = self(z[:, :, y0:y1, x0:x1])
                if out is None:  # accumulate in float32: bf16 sums of weighted tiles would lose bits
                    out = torch.zeros(b, img.shape[1], h * s, w * s, device=z.device, dtype=torch.float32)
                region = out[:, :, y0 * s:y1 * s, x0 * s:x1 * s]
                region.addcmul_(img.float(), wyk[:, None] * wxk[None, :])
                del img
        return out.to(self.dtype)

    def _resolve_tiling(self, h: int, w: int, tile: int | str | None,
                        overlap: int | None) -> tuple[int | None, int]:
        if tile is None:
            return None, 0
        if isinstance(tile, str):
            if tile != "auto":
                raise ValueError(f"tile must be None, a positive int or 'auto', got {tile!r}")
            if h * w <= self.auto_tile_area:
                return None, 0
            tile = self.auto_tile
        if not isinstance(tile, int) or isinstance(tile, bool) or tile <= 0:
            raise ValueError(f"tile must be None, a positive int or 'auto', got {tile!r}")
        if overlap is None:
            overlap = tile // 4
        if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < tile:
            raise ValueError(f"tile_overlap must be an int in [0, tile={tile}), got {overlap!r}")
        return tile, overlap

    def _as_4d(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim == 5:
            if z.shape[2] != 1:
                raise ValueError(f"expected one frame (B, C, 1, h, w), got shape {tuple(z.shape)}")
            z = z[:, :, 0]
        if z.ndim != 4 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"expected latents (B, {self.config.z_dim}, h, w), got shape {tuple(z.shape)}")
        return z
