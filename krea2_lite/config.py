"""Krea 2 transformer configuration: one dataclass, named presets, derived sizes computed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _round_up(value: int, multiple: int) -> int:
    return multiple * ((value + multiple - 1) // multiple)


def swiglu_width(features: int, multiplier: int, multiple: int = 128) -> int:
    """Hidden width of a SwiGLU MLP: int(2·features/3)·multiplier, rounded up to `multiple`."""
    return _round_up(int(2 * features / 3) * multiplier, multiple)


@dataclass(frozen=True)
class Krea2Config:
    """Shape of a Krea 2 transformer, with the official field names (krea-2 `SingleMMDiTConfig`).

    Only independent quantities are stored; head dims, RoPE axes and MLP widths are properties.
    Blocks never carry biases in the released model, so there is no `bias` field.
    """

    features: int = 6144
    tdim: int = 256
    txtdim: int = 2560
    heads: int = 48
    kvheads: int = 12
    multiplier: int = 4
    layers: int = 28
    patch: int = 2
    channels: int = 16
    txtheads: int = 20
    txtkvheads: int = 20
    txtlayers: int = 12
    theta: float = 1000.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("features", "tdim", "txtdim", "heads", "kvheads", "multiplier", "layers",
                     "patch", "channels", "txtheads", "txtkvheads", "txtlayers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if problems:
            raise ValueError("invalid Krea2Config: " + "; ".join(problems))
        if self.features % self.heads:
            problems.append(f"features={self.features} is not divisible by heads={self.heads}")
        elif self.heads % self.kvheads:
            problems.append(f"heads={self.heads} is not divisible by kvheads={self.kvheads}")
        elif self.headdim < 16 or self.headdim % 2:
            problems.append(f"head dim {self.headdim} must be even and >= 16 (3-axis RoPE)")
        if self.txtdim % self.txtheads:
            problems.append(f"txtdim={self.txtdim} is not divisible by txtheads={self.txtheads}")
        elif self.txtheads % self.txtkvheads:
            problems.append(f"txtheads={self.txtheads} is not divisible by txtkvheads={self.txtkvheads}")
        if self.tdim % 2:
            problems.append(f"tdim={self.tdim} must be even (cos/sin halves)")
        if problems:
            raise ValueError("invalid Krea2Config: " + "; ".join(problems))

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def headdim(self) -> int:
        return self.features // self.heads

    @property
    def txtheaddim(self) -> int:
        return self.txtdim // self.txtheads

    @property
    def axes(self) -> tuple[int, int, int]:
        """Head-dim split of the 3-axis RoPE (time, row, column)."""
        sixteenth = self.headdim // 16
        return (self.headdim - 12 * sixteenth, 6 * sixteenth, 6 * sixteenth)

    @property
    def mlpdim(self) -> int:
        return swiglu_width(self.features, self.multiplier)

    @property
    def txtmlpdim(self) -> int:
        return swiglu_width(self.txtdim, self.multiplier)

    @property
    def in_channels(self) -> int:
        """Width of one packed latent token: channels · patch²."""
        return self.channels * self.patch ** 2

    # ---- presets ------------------------------------------------------------------------------
    @classmethod
    def krea2(cls) -> "Krea2Config":
        """The released 12.9B shape (Raw and Turbo share it)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> "Krea2Config":
        """A few-MB model for tests: every code path of the full model, GQA ratio 2."""
        base = dict(features=64, tdim=32, txtdim=32, heads=2, kvheads=1, multiplier=4, layers=2,
                    patch=2, channels=4, txtheads=2, txtkvheads=2, txtlayers=3, theta=1000.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def medium(cls, **overrides) -> "Krea2Config":
        """Full-width heads at a fraction of the depth: for CPU timing and kernel shapes."""
        base = dict(features=768, tdim=256, txtdim=256, heads=6, kvheads=2, multiplier=4, layers=4,
                    patch=2, channels=16, txtheads=4, txtkvheads=4, txtlayers=12, theta=1000.0)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "Krea2Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Krea2Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Krea2Config fields {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (no model is built)."""
        f, hd, t = self.features, self.headdim, self.txtdim
        attn = f * hd * self.heads * 2 + 2 * f * hd * self.kvheads + f * f + 2 * hd
        block = attn + 3 * f * self.mlpdim + 2 * f + 6 * f
        thd = self.txtheaddim
        txt_block = (t * thd * self.txtheads * 2 + 2 * t * thd * self.txtkvheads + t * t + 2 * thd
                     + 3 * t * self.txtmlpdim + 2 * t)
        other = (self.in_channels * f + f                     # first
                 + self.tdim * f + f + f * f + f              # tmlp
                 + f * 6 * f + 6 * f                          # tproj
                 + 4 * txt_block + self.txtlayers             # txtfusion
                 + t + t * f + f + f * f + f                  # txtmlp
                 + f + 2 * f + f * self.in_channels + self.in_channels)  # last
        return self.layers * block + other
