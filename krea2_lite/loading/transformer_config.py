"""A transformer checkpoint's model config, recovered from its tensor shapes, and the check of its
keys and shapes against a config (the layouts themselves are `files.checkpoint`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import Krea2Config, swiglu_width
from ..errors import CheckpointKeysError, Krea2LiteError, ShapeMismatchError
from ..files.checkpoint import CheckpointSource
from ..model import Krea2Transformer


def infer_config(shapes: dict[str, tuple[int, ...]], *, theta: float = 1000.0, patch: int = 2,
                 where: str = "checkpoint") -> Krea2Config:
    """Recover a Krea2Config from official-layout tensor shapes (patch 2 unless given)."""
    try:
        return _infer_config(shapes, theta=theta, patch=patch, where=where)
    except Krea2LiteError:
        raise
    except (ValueError, IndexError, ZeroDivisionError, TypeError) as exc:
        # Degenerate shapes (a 0-length norm scale, a 1-D weight) reach arithmetic before any check.
        raise ShapeMismatchError(f"{where}: tensor shapes that fit no Krea 2 transformer ({exc})") from None


def _infer_config(shapes: dict[str, tuple[int, ...]], *, theta: float, patch: int, where: str) -> Krea2Config:
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointKeysError(f"{where}: missing tensor '{name}', needed to infer the model shape")
        return shapes[name]

    features, in_channels = shape("first.weight")
    layers = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if layers == 0:
        raise CheckpointKeysError(f"{where}: no transformer blocks ('blocks.N.*') found")
    headdim = shape("blocks.0.attn.qknorm.qnorm.scale")[0]
    kv_rows = shape("blocks.0.attn.wk.weight")[0]
    txtdim = shape("txtmlp.1.weight")[1]
    txt_headdim = shape("txtfusion.layerwise_blocks.0.attn.qknorm.qnorm.scale")[0]
    txt_kv_rows = shape("txtfusion.layerwise_blocks.0.attn.wk.weight")[0]
    mlp = shape("blocks.0.mlp.gate.weight")[0]
    txt_mlp = shape("txtfusion.layerwise_blocks.0.mlp.gate.weight")[0]
    # Rounding to 128 can make several multipliers give the same widths (same model); prefer
    # the released value 4 then.
    fits = [m for m in range(1, 33) if swiglu_width(features, m) == mlp and swiglu_width(txtdim, m) == txt_mlp]
    if not fits:
        raise ShapeMismatchError(f"{where}: MLP widths {mlp} / {txt_mlp} match no multiplier for "
                                 f"features={features}, txtdim={txtdim}")
    multiplier = 4 if 4 in fits else fits[0]
    if in_channels % (patch * patch):
        raise ShapeMismatchError(f"{where}: input width {in_channels} is not channels·{patch}²")
    return Krea2Config(
        features=features, tdim=shape("tmlp.0.weight")[1], txtdim=txtdim,
        heads=features // headdim, kvheads=kv_rows // headdim, multiplier=multiplier, layers=layers,
        patch=patch, channels=in_channels // (patch * patch), txtheads=txtdim // txt_headdim,
        txtkvheads=txt_kv_rows // txt_headdim, txtlayers=shape("txtfusion.projector.weight")[1],
        theta=float(theta))


def check_diffusers_config(cfg: dict, config: Krea2Config, where: Path) -> None:
    """A diffusers config may say things the tensor shapes cannot; they must agree with `config`."""
    axes = cfg.get("axes_dims_rope")
    if axes is not None and tuple(axes) != config.axes:
        raise ShapeMismatchError(f"{where}/config.json: axes_dims_rope={list(axes)} differs from the "
                                 f"Krea 2 split {list(config.axes)} for head dim {config.headdim}")
    theta = cfg.get("rope_theta")
    if theta is not None and float(theta) != config.theta:
        raise ShapeMismatchError(f"{where}/config.json: rope_theta={theta} but the config says {config.theta}")


def expected_shapes(config: Krea2Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Krea2Transformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_keys_and_shapes(source: CheckpointSource, config: Krea2Config, explicit: bool) -> None:
    expected = expected_shapes(config)
    found = source.shapes()
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[:4]})")
        raise CheckpointKeysError(f"{source.location}: tensors do not match a Krea 2 transformer with "
                                  f"{config.layers} blocks: " + "; ".join(parts))
    wrong = [(k, found[k], expected[k]) for k in expected if found[k] != expected[k]]
    if wrong:
        k, got, want = wrong[0]
        origin = "the given config" if explicit else "the config inferred from the file"
        raise ShapeMismatchError(f"{source.location}: tensor '{k}' has shape {got} but {origin} expects "
                                 f"{want} ({len(wrong)} tensor(s) disagree)")
