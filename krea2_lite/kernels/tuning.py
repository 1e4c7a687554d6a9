"""The per-GPU choices of `KREA2_LITE_KERNELS=auto`, read from a small committed table.

`auto` keeps today's safe defaults (dequantize + cuBLAS for weight-only matmuls; the torch activation
quantizer with `torch._int_mm` / `torch._scaled_mm` for W8A8) on every GPU the table does not name.
A GPU the table names gets the kernel that `python -m benchmarks.gpu_proof` measured fastest there *and*
found correct, per kernel family, quantized type and token count. The table is data, not code: a
proof run fills it (`python -m benchmarks.gpu_proof --write-table`, or `--table-from RESULT.json` afterwards).

Table (`tuning.json` beside this file, or the file named by `KREA2_LITE_TUNING`):

    {"format": "krea2_lite.kernel_tuning", "version": 1,
     "gpus": {"NVIDIA H200": {"capability": [9, 0],
                              "qmatmul": {"int8": [[0, "triton"], [2048, "torch"]], ...},
                              "w8a8": {"int8": [[0, "torch"], [8192, "dequant"]], ...},
                              "measured": {...provenance...}},
              "sm_90": {...}}}

A GPU is looked up by its exact `torch.cuda.get_device_name()` first, then by `sm_<major><minor>`.
Each rule list is sorted steps `[min_tokens, choice]`: the last step whose min_tokens ≤ the layer's
token count (rows of x) applies; below the first step nothing is chosen (the default path).
Choices: qmatmul "torch" (dequantize + cuBLAS) | "triton" (the Triton dequant-matmul); w8a8 "torch"
(torch quantizer + `_int_mm` / `_scaled_mm`) | "triton" (Triton quantizer + GEMM) | "dequant"
(dequantize both operands, one cuBLAS GEMM).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from ..errors import Krea2LiteError
from ..files.jsonfile import read_json

FORMAT = "krea2_lite.kernel_tuning"
VERSION = 1
TABLE_PATH = Path(__file__).with_name("tuning.json")
CHOICES = {"qmatmul": ("torch", "triton"), "w8a8": ("torch", "triton", "dequant"), "gguf_linear": ("torch", "triton")}
QTYPES = {"qmatmul": ("int8", "fp8", "int4"), "w8a8": ("int8", "fp8"), "gguf_linear": ("Q8_0", "Q4_K")}


class TuningTableError(Krea2LiteError, ValueError):
    """The kernel tuning table is not what krea2_lite expects (the message names the file and key)."""


def table_path() -> Path:
    """The table in use: $KREA2_LITE_TUNING when set, else the committed `tuning.json`."""
    return Path(os.environ.get("KREA2_LITE_TUNING") or TABLE_PATH)


def _check_rules(rules, where: str, kernel: str) -> list[tuple[int, str]]:
    if not isinstance(rules, list) or not rules:
        raise TuningTableError(f"{where}: expected a non-empty list of [min_tokens, choice] steps, got {rules!r}")
    steps, last = [], -1
    for step in rules:
        if (not isinstance(step, list) or len(step) != 2 or isinstance(step[0], bool)
                or not isinstance(step[0], int) or step[0] < 0):
            raise TuningTableError(f"{where}: each step must be [min_tokens (int >= 0), choice], got {step!r}")
        if step[1] not in CHOICES[kernel]:
            raise TuningTableError(f"{where}: choice {step[1]!r} is not one of {', '.join(CHOICES[kernel])}")
        if step[0] <= last:
            raise TuningTableError(f"{where}: min_tokens must increase, got {[s[0] for s in rules]}")
        last = step[0]
        steps.append((step[0], step[1]))
    return steps


def validate(table, source: str) -> dict:
    """Check a parsed table; returns {gpu key: {kernel: {qtype: [(min_tokens, choice), ...]}}}."""
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise TuningTableError(f"{source}: not a krea2_lite kernel tuning table (expected \"format\": \"{FORMAT}\")")
    if table.get("version") != VERSION:
        raise TuningTableError(f"{source}: table version {table.get('version')!r}; this krea2_lite reads {VERSION}")
    gpus = table.get("gpus")
    if not isinstance(gpus, dict):
        raise TuningTableError(f"{source}: \"gpus\" must be an object keyed by GPU name or sm_XY, got {gpus!r}")
    parsed = {}
    for key, entry in gpus.items():
        if not isinstance(entry, dict):
            raise TuningTableError(f"{source}: gpus[{key!r}] must be an object, got {entry!r}")
        rules = {}
        for kernel in CHOICES:
            per_type = entry.get(kernel, {})
            if not isinstance(per_type, dict):
                raise TuningTableError(f"{source}: gpus[{key!r}].{kernel} must be an object keyed by quant type")
            for qtype, steps in per_type.items():
                if qtype not in QTYPES[kernel]:
                    raise TuningTableError(f"{source}: gpus[{key!r}].{kernel}: unknown quant type {qtype!r} "
                                           f"(expected one of {', '.join(QTYPES[kernel])})")
                rules.setdefault(kernel, {})[qtype] = _check_rules(steps, f"{source}: gpus[{key!r}].{kernel}.{qtype}",
                                                                   kernel)
        parsed[key] = rules
    return parsed


def read_table(path: str | os.PathLike) -> dict:
    """The raw JSON object of a table file (validated), for tools that rewrite it."""
    path = Path(path)
    try:
        table = read_json(path, expect=None, what="kernel tuning table (cannot read it)")  # size, depth, digit limits
    except Krea2LiteError as exc:
        raise TuningTableError(str(exc)) from None
    validate(table, str(path))
    return table


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict:
    if not Path(path).exists() and path == str(TABLE_PATH):
        return {}  # an install without the table: every GPU keeps the defaults
    return validate(read_table(path), path)


def lookup(parsed: dict, name: str, capability: tuple[int, int]) -> dict:
    """One GPU's rules from a parsed table: by exact device name, else by sm_XY; {} when unmeasured."""
    return parsed.get(name) or parsed.get(f"sm_{capability[0]}{capability[1]}") or {}


@functools.lru_cache(maxsize=16)
def _device_rules(path: str, index: int) -> dict:
    return lookup(_load(path), torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))


def choose(rules: dict, kernel: str, qtype: str, tokens: int) -> str | None:
    """The choice of `rules` (one GPU's parsed entry) for this kernel, type and token count."""
    chosen = None
    for min_tokens, choice in rules.get(kernel, {}).get(qtype, ()):
        if tokens >= min_tokens:
            chosen = choice
    return chosen


def auto_choice(kernel: str, qtype: str, x: torch.Tensor) -> str | None:
    """What `auto` should run for `kernel` ("qmatmul" | "w8a8") on `qtype` with input x (..., K):
    the table's choice for x's GPU and token count, or None (keep the default path)."""
    if not x.is_cuda:
        return None
    rules = _device_rules(str(table_path()), x.device.index if x.device.index is not None
                          else torch.cuda.current_device())
    return choose(rules, kernel, qtype, x.numel() // max(1, x.shape[-1])) if rules else None


def clear_cache() -> None:
    """Forget the loaded table (after rewriting it, or when KREA2_LITE_TUNING changes)."""
    _load.cache_clear()
    _device_rules.cache_clear()


def write_entry(path: str | os.PathLike, key: str, entry: dict) -> None:
    """Put `entry` (validated) under gpus[key] of the table at `path`, atomically (temp file, rename)."""
    path = Path(path)
    table = read_table(path) if path.exists() else {"format": FORMAT, "version": VERSION, "gpus": {}}
    table["gpus"][key] = entry
    validate(table, str(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    clear_cache()
