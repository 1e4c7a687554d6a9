"""The Qwen-Image VAE encoder (used by Krea 2 for images in), rebuilt as a single-frame 2D network.

For one frame the causal video encoder collapses exactly as the decoder does (see `vae.py`): every
causal 3D conv is a 2D conv with the kernel's last temporal slice, and the ``downsample3d``
resamplers only cache the first frame (their ``time_conv`` never runs), so both resampler kinds
are a zero pad on the right and bottom, then a 3x3 conv with stride 2.

What is left: ``conv_in`` -> down blocks (``num_res_blocks`` residual blocks per level, a stride-2
downsampler on all but the last level; ``attn_scales`` is empty in the released VAE, and diffusers
0.42 cannot run a non-empty one, so like the decoder this module does not build those blocks) -> mid block -> RMS norm -> SiLU -> ``conv_out`` (2·z_dim channels) ->
``quant_conv`` (1x1).  The first z_dim channels are the latent distribution's mean, the rest its
log-variance; images in only ever need the mean.

Parameter names equal diffusers' state-dict keys (``encoder.conv_in.weight``, ``quant_conv.*``).
The layers are the decoder's own (imported), so both halves compute the same arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import (
    DEFAULT_AUTO_TILE_AREA,
    DEFAULT_TILE,
    QwenImageVAEConfig,
    QwenImageVAEDecoder,
    _blend_weights,
    _MidBlock,
    _ResidualBlock,
    _RMSNorm,
    tile_spans,
)

__all__ = ["QwenImageVAEEncoder"]


class _Downsample(nn.Module):
    """``downsample2d`` / ``downsample3d`` for one frame: pad right/bottom by one, 3x3 conv, stride 2.

    ``resample.1`` keeps diffusers' key names; ``downsample3d``'s ``time_conv`` never runs for one frame.
    """

    def __init__(self, dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class _Encoder2d(nn.Module):
    """diffusers ``QwenImageEncoder3d`` for one frame (attribute names kept for the state dict)."""

    def __init__(self, cfg: QwenImageVAEConfig, dtype: torch.dtype | None = None):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = nn.Conv2d(cfg.input_channels, dims[0], 3, padding=1, dtype=dtype)
        self.down_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(_ResidualBlock(in_dim, out_dim, dtype))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                self.down_blocks.append(_Downsample(out_dim, dtype))
        self.mid_block = _MidBlock(dims[-1], dtype)
        self.norm_out = _RMSNorm(dims[-1], dtype)
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class QwenImageVAEEncoder(nn.Module):
    """Qwen-Image VAE encoder for images: ``encoder.*`` + ``quant_conv``, 2D convs only.

    ``encode(x)`` takes images (B, 3, H, W) in [-1, 1] (H, W multiples of 8) and returns the latent
    distribution's mean (B, z_dim, H/8, W/8), in VAE space (not normalised; see
    :meth:`normalize_latents` for the transformer's space).
    """

    def __init__(self, config: QwenImageVAEConfig | None = None, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config if config is not None else QwenImageVAEConfig()
        self.encoder = _Encoder2d(self.config, dtype)
        self.quant_conv = nn.Conv2d(2 * self.config.z_dim, 2 * self.config.z_dim, 1, dtype=dtype)
        self.auto_tile_area = DEFAULT_AUTO_TILE_AREA  # in latents, like the decoder's
        self.auto_tile = DEFAULT_TILE

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def spatial_scale(self) -> int:
        return self.config.spatial_scale

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE space -> transformer space, the decoder's arithmetic: ``(z - mean) * (1 / std)``."""
        shape = (1, self.config.z_dim) + (1,) * (z.ndim - 2)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = (1.0 / torch.tensor(self.config.latents_std).view(shape)).to(z.device, z.dtype)
        return (z - mean) * inv_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Untiled encode: images (B, 3, H, W) in [-1, 1] -> latent mean (B, z_dim, H/8, W/8)."""
        return self.quant_conv(self.encoder(x))[:, : self.config.z_dim]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, tile: int | str | None = None,
               tile_overlap: int | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latent mean (B, z_dim, H/8, W/8), VAE space.

        Equals diffusers ``AutoencoderKLQwenImage.encode(x[:, :, None]).latent_dist.mean[:, :, 0]``
        untiled.  ``tile``: None (whole image), an int maximum tile side *in latents*, or "auto"
        (tiles of ``self.auto_tile`` only when the latent area exceeds ``self.auto_tile_area``).
        ``tile_overlap`` in latents, default tile // 4; overlapping latents are blended linearly.
        Tiles run one at a time into a float32 accumulator, so activation memory follows the tile
        size.  Tiling is approximate: the mid block's attention sees only its tile.
        """
        x = self._check_images(x).to(self.device, self.dtype)
        s = self.spatial_scale
        h, w = x.shape[-2] // s, x.shape[-1] // s
        # The decoder's tiling rules (it reads only auto_tile / auto_tile_area, which this class has too).
        tile, tile_overlap = QwenImageVAEDecoder._resolve_tiling(self, h, w, tile, tile_overlap)
        if tile is None:
            return self(x)
        ys, xs = tile_spans(h, tile, tile_overlap), tile_spans(w, tile, tile_overlap)
        if len(ys) == 1 and len(xs) == 1:
            return self(x)
        return self._tiled(x, ys, xs)

    def _tiled(self, x: torch.Tensor, ys: Sequence[tuple[int, int]], xs: Sequence[tuple[int, int]]) -> torch.Tensor:
        s = self.spatial_scale
        b = x.shape[0]
        h, w = x.shape[-2] // s, x.shape[-1] // s
        wy = [t.to(x.device) for t in _blend_weights(ys, 1)]
        wx = [t.to(x.device) for t in _blend_weights(xs, 1)]
        out = torch.zeros(b, self.config.z_dim, h, w, device=x.device, dtype=torch.float32)
        for (y0, y1), wyk in zip(ys, wy):
            for (x0, x1), wxk in zip(xs, wx):
                z = self(x[:, :, y0 * s:y1 * s, x0 * s:x1 * s])
                out[:, :, y0:y1, x0:x1].addcmul_(z.float(), wyk[:, None] * wxk[None, :])
                del z
        return out.to(self.dtype)

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spatial_scale
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.config.input_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected images (B, {self.config.input_channels}, H, W), got {shape}")
        if x.shape[-2] % s or x.shape[-1] % s or x.shape[-2] == 0 or x.shape[-1] == 0:
            raise ValueError(f"image height and width must be positive multiples of {s}, got "
                             f"{x.shape[-2]}×{x.shape[-1]}")
        return x
