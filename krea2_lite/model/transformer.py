"""The Krea 2 single-stream DiT, with the official module names so released weights load as-is."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import kernels
from ..config import Krea2Config
from .layers import Attention, RMSNorm, SwiGLU, modulate
from .rope import rope_tables


def timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoid of t·1000, cos half first: t (B,) → (B, 1, dim) in `dtype`."""
    half = dim // 2
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1e3)[:, None, None] * freqs
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1).to(dtype)


class SharedModulation(nn.Module):
    """Per-block learned table `lin` (6·dim) added to the shared timestep vector."""

    def __init__(self, dim: int, parts: int):
        super().__init__()
        self.parts = parts
        self.lin = nn.Parameter(torch.zeros(parts * dim))

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Sum in float32 (the table is stored so), then back to the activation dtype: applying
        # float32 vectors to (B, L, dim) activations would add full-size float32 passes per block.
        return (vec.float() + self.lin).to(vec.dtype).chunk(self.parts, dim=-1)


class SingleStreamBlock(nn.Module):
    def __init__(self, config: Krea2Config):
        super().__init__()
        f = config.features
        self.mod = SharedModulation(f, 6)
        self.prenorm = RMSNorm(f)
        self.postnorm = RMSNorm(f)
        self.attn = Attention(f, config.heads, config.kvheads)
        self.mlp = SwiGLU(f, config.mlpdim)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        prescale, preshift, pregate, postscale, postshift, postgate = self.mod(vec)
        h = self.attn(modulate(self.prenorm(x), prescale, preshift), rope, key_mask)
        x = x + pregate * h
        h = self.mlp(modulate(self.postnorm(x), postscale, postshift))
        return x + postgate * h


class TextFusionBlock(nn.Module):
    """Pre-norm block without RoPE or time modulation (text fusion stage)."""

    def __init__(self, config: Krea2Config):
        super().__init__()
        d = config.txtdim
        self.prenorm = RMSNorm(d)
        self.postnorm = RMSNorm(d)
        self.attn = Attention(d, config.txtheads, config.txtkvheads)
        self.mlp = SwiGLU(d, config.txtmlpdim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.prenorm(x), None, key_mask)
        return x + self.mlp(self.postnorm(x))


class TextFusion(nn.Module):
    """Two blocks across the tapped encoder layers of each token, Linear(txtlayers→1), two across tokens."""

    def __init__(self, config: Krea2Config):
        super().__init__()
        self.layerwise_blocks = nn.ModuleList([TextFusionBlock(config) for _ in range(2)])
        self.projector = nn.Linear(config.txtlayers, 1, bias=False)
        self.refiner_blocks = nn.ModuleList([TextFusionBlock(config) for _ in range(2)])

    def forward(self, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, layers, dim = context.shape
        x = context.reshape(batch * length, layers, dim)
        for block in self.layerwise_blocks:
            x = block(x)
        x = self.projector(x.reshape(batch, length, layers, dim).transpose(-1, -2)).squeeze(-1)
        for block in self.refiner_blocks:
            x = block(x, key_mask)
        return x


class LastLayer(nn.Module):
    def __init__(self, config: Krea2Config):
        super().__init__()
        self.norm = RMSNorm(config.features)
        self.linear = nn.Linear(config.features, config.in_channels, bias=True)
        self.modulation = nn.Module()
        self.modulation.lin = nn.Parameter(torch.zeros(2, config.features))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        scale, shift = (t_emb.float() + self.modulation.lin).to(t_emb.dtype).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), scale, shift))


class Krea2Transformer(nn.Module):
    """Krea 2 flow-matching transformer; `state_dict()` keys equal the official checkpoint's.

    forward(img, context, t, pos, mask=None) → velocity (B, Limg, channels·patch²):
      img     (B, Limg, channels·patch²) packed latents
      context (B, Ltxt, txtlayers, txtdim) stacked text-encoder hidden states
      t       (B,) flow time in [0, 1] (1 = noise)
      pos     (B, Ltxt+Limg, 3) or (Ltxt+Limg, 3) RoPE coordinates (text at 0, image (0,row,col))
      mask    (B, Ltxt+Limg) or (B, Ltxt) bool, True = real token; None = all real.
    Padded tokens are masked as attention keys only (every query row keeps valid keys), so real
    tokens get exactly the result of running without the padding.
    """

    def __init__(self, config: Krea2Config):
        super().__init__()
        self.config = config
        f = config.features
        self.first = nn.Linear(config.in_channels, f, bias=True)
        self.blocks = nn.ModuleList([SingleStreamBlock(config) for _ in range(config.layers)])
        self.tmlp = nn.Sequential(nn.Linear(config.tdim, f), nn.GELU(approximate="tanh"), nn.Linear(f, f))
        self.txtfusion = TextFusion(config)
        self.txtmlp = nn.Sequential(RMSNorm(config.txtdim), nn.Linear(config.txtdim, f),
                                    nn.GELU(approximate="tanh"), nn.Linear(f, f))
        self.last = LastLayer(config)
        self.tproj = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(f, 6 * f))

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: that of the input projection `first` (always kept in the model dtype)."""
        return self.first.weight.dtype

    @kernels.backend_scope()  # KREA2_LITE_KERNELS is read once per forward: all its kernels agree
    def forward(self, img: torch.Tensor, context: torch.Tensor, t: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        batch, img_len, _ = img.shape
        txt_len = context.shape[1]
        if context.ndim != 4 or context.shape[2:] != (cfg.txtlayers, cfg.txtdim):
            raise ValueError(f"context must be (B, Ltxt, {cfg.txtlayers}, {cfg.txtdim}), got {tuple(context.shape)}")
        if img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img must be (B, Limg, {cfg.in_channels}), got {tuple(img.shape)}")
        if pos.shape[-2] != txt_len + img_len:
            raise ValueError(f"pos covers {pos.shape[-2]} tokens; text + image = {txt_len + img_len}")
        key_mask = txt_mask = None
        if mask is not None:
            mask = mask.to(device=img.device, dtype=torch.bool)
            if mask.shape == (batch, txt_len):
                mask = torch.cat([mask, mask.new_ones(batch, img_len)], dim=1)
            if mask.shape != (batch, txt_len + img_len):
                raise ValueError(f"mask must be (B, Ltxt+Limg) or (B, Ltxt), got {tuple(mask.shape)}")
            key_mask, txt_mask = mask, mask[:, :txt_len]

        dtype = self.compute_dtype
        x = self.first(img.to(dtype))
        t_emb = self.tmlp(timestep_embedding(t, cfg.tdim, dtype))
        vec = self.tproj(t_emb)
        text = self.txtmlp(self.txtfusion(context.to(dtype), txt_mask))
        x = torch.cat((text, x), dim=1)
        rope = rope_tables(pos.to(img.device), cfg.axes, cfg.theta)
        for block in self.blocks:
            x = block(x, vec, rope, key_mask)
        return self.last(x[:, txt_len:], t_emb)
