"""What a step cache is asked to do: `CacheSpec` and its string form (`--cache SPEC`, PNG metadata).

Grammar: `METHOD[:VALUE][,KEY=VALUE...]`
  fbcache:T        First-Block-Cache: reuse the last computed residual of the later blocks when the
                   first blocks' output residual changed by less than T (relative L1) since the last
                   fully computed step.
  taylor:O         the same decision; the skipped residual is extrapolated (order O, in the flow time
                   t) from the last O+1 fully computed residuals instead of reused.
Keys: threshold (T; taylor's VALUE is its order), order, first (F: blocks always run), warmup (W:
first steps always computed), tail (E: last steps always computed), max_skip (M: most steps skipped
in a row). Every key has a default measured on the demo model (docs/step-caching.md).
`CacheSpec.name` is the full canonical string, so a PNG records every knob and reproduces the image
even if a default changes later.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ArgumentError, ArgumentTypeError

METHODS = ("fbcache", "taylor")
# Defaults chosen from benchmarks/step_cache.py on the demo model (52 steps, CFG 3.5): see
# docs/step-caching.md. `threshold` is per method: the predictor tolerates a larger one.
DEFAULT_THRESHOLD = {"fbcache": 0.10, "taylor": 0.20}
DEFAULT_ORDER = 1
DEFAULTS = dict(first=1, warmup=4, tail=2, max_skip=3)
MAX_ORDER = 3
KEYS = ("threshold", "order", "first", "warmup", "tail", "max_skip")


@dataclass(frozen=True)
class CacheSpec:
    """A step cache's settings; see the module docstring. `order` is 0 for fbcache (plain reuse)."""

    method: str = "fbcache"
    threshold: float | None = None  # None: the method's default
    order: int | None = None  # None: 0 for fbcache, DEFAULT_ORDER for taylor
    first: int = DEFAULTS["first"]
    warmup: int = DEFAULTS["warmup"]
    tail: int = DEFAULTS["tail"]
    max_skip: int = DEFAULTS["max_skip"]

    def __post_init__(self):
        if self.method not in METHODS:
            raise ArgumentError(f"cache method must be one of {METHODS}, got {self.method!r}")
        if self.threshold is None:
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD[self.method])
        if self.order is None:
            object.__setattr__(self, "order", DEFAULT_ORDER if self.method == "taylor" else 0)
        _check_number("threshold", self.threshold)
        _check_int("order", self.order, 1 if self.method == "taylor" else 0,
                   MAX_ORDER if self.method == "taylor" else 0)
        _check_int("first", self.first, 1, 1000)
        for key in ("warmup", "tail"):
            _check_int(key, getattr(self, key), 0, 1000)
        _check_int("max_skip", self.max_skip, 1, 1000)

    @property
    def name(self) -> str:
        """The canonical string: every knob spelled out, parsed back by `parse_cache`."""
        head = f"{self.method}:{self.threshold:g}" if self.method == "fbcache" else f"taylor:{self.order}"
        keys = [("threshold", f"{self.threshold:g}")] if self.method == "taylor" else []
        keys += [(k, getattr(self, k)) for k in ("first", "warmup", "tail", "max_skip")]
        return head + "".join(f",{k}={v}" for k, v in keys)

    def __str__(self) -> str:
        return self.name


def _check_int(key: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"cache {key} must be an int in {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise ArgumentError(f"cache {key} must be in {low}..{high}, got {value}")


def _check_number(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"cache {key} must be a number, got {value!r}")
    if not math.isfinite(value) or not 0 <= value <= 10:
        raise ArgumentError(f"cache {key} must be a finite number in [0, 10], got {value!r}")


def _value(key: str, text: str, spec: str):
    try:
        return float(text) if key == "threshold" else int(text)
    except ValueError:
        kind = "a number" if key == "threshold" else "an int"
        raise ArgumentError(f"cache spec {spec!r}: {key} must be {kind}, got {text!r}") from None


def parse_cache(value) -> CacheSpec | None:
    """None, "none", a CacheSpec, or a spec string (grammar above) → CacheSpec or None.
    Any other value, unknown method or key, or out-of-range knob is an ArgumentError naming it."""
    if value is None or isinstance(value, CacheSpec):
        return value
    if not isinstance(value, str):
        raise ArgumentTypeError(f"cache must be a spec string such as 'fbcache:0.1' or a CacheSpec, got {value!r}")
    text = value.strip()
    if text.lower() in ("", "none"):
        return None
    head, *pairs = text.split(",")
    method, _, first_value = head.partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise ArgumentError(f"cache spec {value!r}: unknown method {method!r}; expected one of {METHODS}")
    fields = {}
    if first_value.strip():
        key = "threshold" if method == "fbcache" else "order"
        fields[key] = _value(key, first_value.strip(), value)
    for pair in pairs:
        key, sep, item = pair.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or key not in KEYS:
            raise ArgumentError(f"cache spec {value!r}: {pair.strip()!r} is not KEY=VALUE with KEY one of {KEYS}")
        if key in fields:  # "fbcache:0.1,threshold=0.5": which one was meant is not ours to guess
            raise ArgumentError(f"cache spec {value!r}: {key} is given twice")
        fields[key] = _value(key, item.strip(), value)
    try:
        return CacheSpec(method=method, **fields)
    except ArgumentError as exc:
        raise type(exc)(f"cache spec {value!r}: {exc}") from None


def with_defaults(spec: CacheSpec, **changes) -> CacheSpec:
    """`spec` with some knobs changed (benchmarks sweep them)."""
    return dataclasses.replace(spec, **changes)
