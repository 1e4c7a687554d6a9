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

Low-rank corrected int4: `lowrank` = r > 0 (int4 weight-only) gives each quantized layer a bf16
branch U·V of rank r that absorbs the weight's dominant directions, int4 storing W − U·V
(`lowrank.py`). String form "int4-lr{r}", e.g. "int4-lr32".

int4 rounding: `rounding` = "mse-clip" (default: per group, the clipped range of least squared
error) or "minmax" (optimum-quanto's default, what folders written before it record); see
`int4_rounding.py`. It changes how the int4 codes are chosen, not how they are stored or run.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import ArgumentError, ArgumentTypeError

from .int4_rounding import DEFAULT_ROUNDING, ROUNDINGS

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
LOWRANK_NAME = re.compile(r"int4-lr(\d+)")
ROTATED_NAME = re.compile(r"(int8|fp8)-w8a8-rot(\d{1,5})")  # the names QuantSpec.name prints (int8-w8a8-rot128)


def is_quant_name(value) -> bool:
    """True for every quant string `QuantSpec.parse` reads (and `QuantSpec.name` prints)."""
    return isinstance(value, str) and (value in DTYPES or value in SHORTCUTS or LOWRANK_NAME.fullmatch(value)
                                       is not None or ROTATED_NAME.fullmatch(value) is not None)
DEFAULT_INCLUDE = ("blocks.*", "txtfusion.layerwise_blocks.*", "txtfusion.refiner_blocks.*")
KEPT_REASONS = {
    "first": "input projection (kept in the model dtype)",
    "last.": "output projection (kept in the model dtype)",
    "tmlp.": "timestep MLP: its output modulates every block, so its error repeats 28 times",
    "tproj.": "timestep projection: modulates every block, so its error repeats 28 times",
    "txtmlp.": "text projection into the transformer width (small, kept exact)",
    "txtfusion.projector": "12→1 layer mixing weights (12 parameters)",
}


def require_rank(rank: int, argument: str) -> int:
    """A rank the user asked for explicitly (int4-lr{r}, --lowrank r): 0 is refused, not read as off."""
    if rank < 1:
        raise ArgumentError(f"{argument}: the low-rank correction's rank must be at least 1 (at most the smallest "
                         f"quantized layer's min(in_features, out_features); 32 is the usual choice), got {rank}; "
                         "for plain int4 use quant='int4' / omit --lowrank")
    return rank


def check_lowrank(lowrank, dtype: str, activations: str | None) -> int:
    """QuantSpec.lowrank: 0 (off) or a positive rank, int4 weight-only."""
    if isinstance(lowrank, bool) or not isinstance(lowrank, int) or lowrank < 0:
        raise ArgumentError(f"lowrank must be 0 (off) or a positive integer rank, got {lowrank!r}")
    if lowrank and (dtype != "int4" or activations is not None):
        raise ArgumentError(f"lowrank={lowrank} needs int4 weight-only quantization (dtype='int4', no activations), "
                         f"got dtype={dtype!r}, activations={activations!r}")
    return lowrank


def check_rank_fits(rank: int, layers: dict[str, tuple[int, int]]) -> None:
    """Refuse a rank larger than a quantized layer: {name: (out_features, in_features)}."""
    if not rank or not layers:
        return
    name, (out, inp) = min(layers.items(), key=lambda item: min(item[1]))
    if rank > min(out, inp):
        raise ArgumentError(f"lowrank={rank} is larger than layer {name} ({out}×{inp}): for this model the rank "
                         f"must be between 1 and {min(out, inp)} (the smallest quantized layer's "
                         "min(out_features, in_features))")


@dataclass(frozen=True)
class QuantSpec:
    """A quantization recipe: weight type, int4 group size and module-name glob patterns.

    `include` / `exclude` are fnmatch patterns over module names (`blocks.3.mlp.down`); a
    module is quantized when it is an nn.Linear, matches an include and no exclude.
    `activations` (None | "int8" | "fp8", equal to `dtype`) makes the layers W8A8; `rotate` is the
    Hadamard block size (0 = off; True means 128), only with `activations`. `lowrank` (int4 only)
    is the rank of each layer's low-rank correction (0 = none). `rounding` (int4 only) is how int4
    scales are chosen: "mse-clip" (default) or "minmax".
    """

    dtype: str
    group_size: int = 128
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = field(default_factory=tuple)
    activations: str | None = None
    rotate: int = 0
    lowrank: int = 0
    rounding: str = DEFAULT_ROUNDING

    def __post_init__(self) -> None:
        self._check_types()
        if self.dtype not in DTYPES:
            raise ArgumentError(f"quant dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.group_size not in GROUP_SIZES:
            raise ArgumentError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        if self.activations not in ACTIVATIONS:
            raise ArgumentError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.activations is not None and self.activations != self.dtype:
            raise ArgumentError(f"W8A8 needs weights and activations of one type: dtype={self.dtype!r}, "
                             f"activations={self.activations!r}")
        rotate = DEFAULT_ROTATE if self.rotate is True else int(self.rotate or 0)
        if rotate not in ROTATE_SIZES:
            raise ArgumentError(f"rotate must be one of {ROTATE_SIZES} (or True), got {self.rotate!r}")
        if rotate and self.activations is None:
            raise ArgumentError("rotate needs W8A8 (activations='int8' or 'fp8')")
        object.__setattr__(self, "rotate", rotate)
        object.__setattr__(self, "lowrank", check_lowrank(self.lowrank, self.dtype, self.activations))
        if self.rounding not in ROUNDINGS:
            raise ArgumentError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rounding != DEFAULT_ROUNDING and self.dtype != "int4":
            raise ArgumentError(f"rounding={self.rounding!r} applies to int4 only; {self.dtype} uses per-channel absmax")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def _check_types(self) -> None:
        """Types first (values from files and callers): ArgumentTypeError naming the field. A string
        include / exclude is one pattern (never its characters); an empty include selects nothing."""
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise ArgumentTypeError(f"QuantSpec {name} must be a pattern string or a list of them, got {value!r:.80}")
            object.__setattr__(self, name, tuple(value))
        if not self.include:
            raise ArgumentError("QuantSpec include=() selects no layer; a recipe must quantize something")
        if not isinstance(self.dtype, str):
            raise ArgumentTypeError(f"QuantSpec dtype must be a string, got {self.dtype!r:.40}")
        for name in ("group_size", "lowrank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ArgumentTypeError(f"QuantSpec {name} must be an integer, got {value!r:.40}")
        if not isinstance(self.rotate, int):
            raise ArgumentTypeError(f"QuantSpec rotate must be an integer or True, got {self.rotate!r:.40}")
        if not (self.activations is None or isinstance(self.activations, str)) or not isinstance(self.rounding, str):
            raise ArgumentTypeError(f"QuantSpec activations / rounding must be strings, got {self.activations!r:.40} "
                                    f"/ {self.rounding!r:.40}")

    @classmethod
    def parse(cls, value: "str | QuantSpec | None") -> "QuantSpec | None":
        if value is None or isinstance(value, QuantSpec):
            return value
        if isinstance(value, str):
            if value in SHORTCUTS:
                return cls(**SHORTCUTS[value])
            match = LOWRANK_NAME.fullmatch(value)
            if match:
                return cls("int4", lowrank=require_rank(int(match.group(1)), f"quant={value!r}"))
            match = ROTATED_NAME.fullmatch(value)
            if match:
                return cls(match.group(1), activations=match.group(1), rotate=int(match.group(2)))
            return cls(value)
        raise ArgumentTypeError(f"quant must be None, one of {DTYPES + tuple(SHORTCUTS)}, 'int4-lr{{rank}}' or a QuantSpec, "
                        f"got {value!r}")

    @property
    def name(self) -> str:
        """Short name: int8, int8-w8a8, int8-w8a8-rot128, …"""
        if self.lowrank:
            return f"{self.dtype}-lr{self.lowrank}"
        if self.activations is None:
            return self.dtype
        return f"{self.dtype}-w8a8" + (f"-rot{self.rotate}" if self.rotate else "")

    def to_dict(self) -> dict:
        data = dict(dtype=self.dtype, group_size=self.group_size, include=list(self.include),
                    exclude=list(self.exclude))
        if self.activations is not None:  # absent = weight-only (what folders before W8A8 say)
            data.update(activations=self.activations, rotate=self.rotate)
        if self.lowrank:  # absent = no low-rank branch (what folders before int4-lr say)
            data.update(lowrank=self.lowrank)
        if self.dtype == "int4":  # absent = min-max (what int4 folders before the clip search say)
            data.update(rounding=self.rounding)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        """A recipe stored in a file (manifest, PNG): every value type-checked by the constructor, never
        converted (int(1e400) would overflow, list("blocks.*") split a pattern into characters)."""
        if not isinstance(data, dict) or "dtype" not in data:
            raise ArgumentTypeError(f"a quant recipe must be an object with a 'dtype', got {data!r:.80}")
        include = data.get("include", DEFAULT_INCLUDE)
        return cls(dtype=data["dtype"], group_size=data.get("group_size", 128),
                   include=include if isinstance(include, str) else tuple(include) if isinstance(include, list)
                   else include, exclude=data.get("exclude", ()),
                   activations=data.get("activations"), rotate=data.get("rotate", 0),
                   lowrank=data.get("lowrank", 0),
                   rounding=data.get("rounding", "minmax" if data["dtype"] == "int4" else DEFAULT_ROUNDING))

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
