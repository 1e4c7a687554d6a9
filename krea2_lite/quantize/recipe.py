"""Which linear layers get quantized, to which type: `QuantSpec` and the default recipe.

Default: every linear inside the transformer blocks and the text-fusion blocks. Kept in the model
dtype: `first` / `last` (input and output projections: every pixel passes through them), `tmlp`,
`tproj` (the timestep path whose output modulates all 28 blocks, so its error is applied 28
times), `txtmlp` (the text projection) and `txtfusion.projector` (12 weights). Together they are
~0.5% of the parameters.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import torch.nn as nn

logger = logging.getLogger("krea2_lite")

DTYPES = ("int8", "fp8", "int4")
GROUP_SIZES = (64, 128, 256)
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
    """

    dtype: str
    group_size: int = 128
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"quant dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @classmethod
    def parse(cls, value: "str | QuantSpec | None") -> "QuantSpec | None":
        if value is None or isinstance(value, QuantSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        raise TypeError(f"quant must be None, 'int8', 'fp8', 'int4' or a QuantSpec, got {value!r}")

    def to_dict(self) -> dict:
        return dict(dtype=self.dtype, group_size=self.group_size, include=list(self.include),
                    exclude=list(self.exclude))

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        return cls(dtype=data["dtype"], group_size=int(data.get("group_size", 128)),
                   include=tuple(data.get("include", DEFAULT_INCLUDE)), exclude=tuple(data.get("exclude", ())))

    def group_for(self, in_features: int) -> int | None:
        """int4 group length for a layer (None for 8-bit types): per row when the row is shorter."""
        if self.dtype != "int4":
            return None
        return in_features if in_features <= self.group_size else self.group_size


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
        elif spec.dtype == "int4" and module.in_features > spec.group_size and module.in_features % spec.group_size:
            kept[name] = f"in_features={module.in_features} is not a multiple of group_size={spec.group_size}"
        else:
            chosen.append(name)
    if log:
        reasons: dict[str, list[str]] = {}
        for name, why in kept.items():
            reasons.setdefault(why, []).append(name)
        logger.info("krea2_lite: quantizing %d linears to %s; keeping %d in the model dtype",
                    len(chosen), spec.dtype, len(kept))
        for why, names in reasons.items():
            logger.info("  kept %s: %s", ", ".join(names[:4]) + (" …" if len(names) > 4 else ""), why)
    return chosen, kept
