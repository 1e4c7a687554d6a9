"""Which linear layers get quantized, to which type: `QuantSpec` and the default recipe.

Default: every linear inside the transformer blocks and the text-fusion blocks. Kept in the model
dtype: `first` / `last` (input and output projections: every pixel passes through them), `tmlp`,
`tproj` (the timestep path whose output modulates all 28 blocks, so its error is applied 28
times), `txtmlp` (the text projection) and `txtfusion.projector` (12 weights). Together they are
~0.5% of the parameters.

W8A8: `activations="int8"` (int8 weights) or `"fp8"` (fp8 weights) also quantizes each layer's
input per token at run time, so the matmul runs on 8-bit tensor cores. `rotate` (int8/fp8 W8A8)
stores the weights as W·H and rotates activations by the same block Hadamard H before quantizing
them, which spreads outlier channels. String shortcuts: "int8-w8a8", "int8-w8a8-rot" (rotate 128),
"fp8-w8a8", "fp8-w8a8-rot".
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import torch.nn as nn

logger = logging.getLogger("krea2_lite")

DTYPES = ("int8", "fp8", "int4")
GROUP_SIZES = (64, 128, 256)
ACTIVATIONS = (None, "int8", "fp8")
ROTATE_SIZES = (0, 16, 32, 64, 128, 256)
DEFAULT_ROTATE = 128
SHORTCUTS = {
    "int8-w8a8": dict(dtype="int8", activations="int8"),
    "int8-w8a8-rot": dict(dtype="int8", activations="int8", rotate=DEFAULT_ROTATE),
    "fp8-w8a8": dict(dtype="fp8", activations="fp8"),
    "fp8-w8a8-rot": dict(dtype="fp8", activations="fp8", rotate=DEFAULT_ROTATE),
}
DEFAULT_INCLUDE = ("blocks.*", "txtfusion.layerwise_blocks.*", "txtfusion.refiner_blocks.*")
KEPT_REASONS = {
    "first": "input projection (kept in the model dtype)",
    "last.": "output projection (kept in the model dtype)",
    "tmlp.": "timestep MLP: its output modulates every block, so its error repeats 28 times",
    "tproj.": "timestep projection: modulates every block, so its error repeats 28 times",
    "txtmlp.": "text projection into the transformer width (small, kept exact)",
    "txtfusion.projector": "12→1 layer mixing weights (12 parameters)",
}


@dataclass(frozen=True)
class QuantSpec:
    """A quantization recipe: weight type, int4 group size and module-name glob patterns.

    `include` / `exclude` are fnmatch patterns over module names (`blocks.3.mlp.down`); a
    module is quantized when it is an nn.Linear, matches an include and no exclude.
    `activations` (None | "int8" | "fp8", equal to `dtype`) makes the layers W8A8; `rotate` is the
    Hadamard block size (0 = off; True means 128), only with `activations`.
    """

    dtype: str
    group_size: int = 128
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = field(default_factory=tuple)
    activations: str | None = None
    rotate: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"quant dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.activations is not None and self.activations != self.dtype:
            raise ValueError(f"W8A8 needs weights and activations of one type: dtype={self.dtype!r}, "
                             f"activations={self.activations!r}")
        rotate = DEFAULT_ROTATE if self.rotate is True else int(self.rotate or 0)
        if rotate not in ROTATE_SIZES:
            raise ValueError(f"rotate must be one of {ROTATE_SIZES} (or True), got {self.rotate!r}")
        if rotate and self.activations is None:
            raise ValueError("rotate needs W8A8 (activations='int8' or 'fp8')")
        object.__setattr__(self, "rotate", rotate)
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @classmethod
    def parse(cls, value: "str | QuantSpec | None") -> "QuantSpec | None":
        if value is None or isinstance(value, QuantSpec):
            return value
        if isinstance(value, str):
            return cls(**SHORTCUTS[value]) if value in SHORTCUTS else cls(value)
        raise TypeError(f"quant must be None, one of {DTYPES + tuple(SHORTCUTS)} or a QuantSpec, got {value!r}")

    @property
    def name(self) -> str:
        """Short name: int8, int8-w8a8, int8-w8a8-rot128, …"""
        if self.activations is None:
            return self.dtype
        return f"{self.dtype}-w8a8" + (f"-rot{self.rotate}" if self.rotate else "")

    def to_dict(self) -> dict:
        data = dict(dtype=self.dtype, group_size=self.group_size, include=list(self.include),
                    exclude=list(self.exclude))
        if self.activations is not None:  # absent = weight-only (what folders before W8A8 say)
            data.update(activations=self.activations, rotate=self.rotate)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        return cls(dtype=data["dtype"], group_size=int(data.get("group_size", 128)),
                   include=tuple(data.get("include", DEFAULT_INCLUDE)), exclude=tuple(data.get("exclude", ())),
                   activations=data.get("activations"), rotate=int(data.get("rotate", 0)))

    def group_for(self, in_features: int) -> int | None:
        """int4 group length for a layer (None for 8-bit types): per row when the row is shorter."""
        if self.dtype != "int4":
            return None
        return in_features if in_features <= self.group_size else self.group_size

    def rotate_for(self, in_features: int) -> int:
        """Hadamard block of a layer: `rotate` when it divides in_features, else 0 (not rotated)."""
        return self.rotate if self.rotate and in_features % self.rotate == 0 else 0


def select_linears(model: nn.Module, spec: QuantSpec, log: bool = True) -> tuple[list[str], dict[str, str]]:
    """(names of the linears to quantize, {name: why it stays in the model dtype})."""
    chosen, kept = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in spec.include):
            kept[name] = next((why for prefix, why in KEPT_REASONS.items() if name.startswith(prefix)),
                              "not matched by the include patterns")
        elif any(fnmatch.fnmatchcase(name, p) for p in spec.exclude):
            kept[name] = "matched an exclude pattern"
        elif module.out_features < 2:  # one output row: nothing to save, and quanto's scale loses its axis
            kept[name] = f"out_features={module.out_features} is too small to quantize"
        elif spec.dtype == "int4" and module.in_features > spec.group_size and module.in_features % spec.group_size:
            kept[name] = f"in_features={module.in_features} is not a multiple of group_size={spec.group_size}"
        else:
            chosen.append(name)
    if log:
        reasons: dict[str, list[str]] = {}
        for name, why in kept.items():
            reasons.setdefault(why, []).append(name)
        logger.info("krea2_lite: quantizing %d linears to %s; keeping %d in the model dtype",
                    len(chosen), spec.name, len(kept))
        for why, names in reasons.items():
            logger.info("  kept %s: %s", ", ".join(names[:4]) + (" …" if len(names) > 4 else ""), why)
    return chosen, kept
