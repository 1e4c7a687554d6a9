"""Random tiny Krea 2 transformers for tests: the diffusers reference and official-key weights."""

from __future__ import annotations

import torch

from krea2_lite import Krea2Config
from krea2_lite.checkpoint import diffusers_to_official_key


def diffusers_transformer(cfg: Krea2Config, seed: int = 0):
    """A diffusers Krea2Transformer2DModel of shape `cfg` with every parameter randomised.

    Zero-initialised tensors (norm scales, modulation tables) are perturbed too, so the test
    exercises the 1+scale convention and the per-block tables.
    """
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(seed)
    model = Krea2Transformer2DModel(
        in_channels=cfg.in_channels, num_layers=cfg.layers, attention_head_dim=cfg.headdim,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kvheads, intermediate_size=cfg.mlpdim,
        timestep_embed_dim=cfg.tdim, text_hidden_dim=cfg.txtdim, num_text_layers=cfg.txtlayers,
        text_num_attention_heads=cfg.txtheads, text_num_key_value_heads=cfg.txtkvheads,
        text_intermediate_size=cfg.txtmlpdim, axes_dims_rope=cfg.axes, rope_theta=cfg.theta)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def official_state_dict(diffusers_model) -> dict[str, torch.Tensor]:
    """The diffusers weights under the official krea-2 names and shapes."""
    out = {}
    for key, value in diffusers_model.state_dict().items():
        name = diffusers_to_official_key(key)
        if name.startswith("blocks.") and name.endswith(".mod.lin"):
            value = value.reshape(-1)
        out[name] = value.detach().clone().contiguous()
    return out


def positions(txt_len: int, rows: int, cols: int) -> torch.Tensor:
    """(txt_len + rows·cols, 3): text at the origin, image tokens at (0, row, col)."""
    pos = torch.zeros(txt_len + rows * cols, 3)
    pos[txt_len:, 1] = torch.arange(rows).repeat_interleave(cols).float()
    pos[txt_len:, 2] = torch.arange(cols).repeat(rows).float()
    return pos


def random_inputs(cfg: Krea2Config, batch: int, txt_len: int, rows: int, cols: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, rows * cols, cfg.in_channels, generator=g)
    context = torch.randn(batch, txt_len, cfg.txtlayers, cfg.txtdim, generator=g)
    t = torch.rand(batch, generator=g)
    return img, context, t, positions(txt_len, rows, cols)
