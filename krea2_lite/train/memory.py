"""The training memory plan: device and host bytes of one LoRA step, from the inference planner's exact
weight counts (`offload.sizes`), refused before any work when nothing fits, naming the closest fit.

Counted on the device: the transformer's weights outside the blocks and its resident blocks (exact, per
quant string), plus `prefetch + 1` reused slots of the largest streamed block when blocks stream
(`train.streaming`: forward order, then reverse order for the backward's recompute); the LoRA's
float32 parameters, gradients and AdamW's two moments (4 × 4 bytes per parameter); activations with
per-block checkpointing: every block's input kept (layers · B·L·f·s), one block recomputed with
everything its backward needs (2 × its widest forward point, `transformer_activation_bytes`, a
bound), the dequantized float32 weight of the layer in backward, and the inference planner's reserve.
On the host: the streamed blocks' pinned buffers (each rounded to a power of two, as PyTorch's
pinned allocator does) and the planner's 2 GiB process reserve.

Resident when it fits; otherwise the fewest streamed blocks that fit (spread over the stack as the
inference planner spreads them); refused only when even streaming every block does not fit, or the
streamed blocks do not fit the RAM budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MemoryPlanError
from ..offload import sizes
from ..offload.planner import HOST_RESERVE_BYTES, RESERVE_BYTES, RESERVE_FRACTION, spread

GiB = 1 << 30
QUANT_LADDER = (None, "fp8", "int8", "int4")
PREFETCH = 1  # two device slots: one block computes while the next one (either direction) copies


@dataclass(frozen=True)
class TrainingPlan:
    weights: int  # device bytes of weights: fixed part + resident blocks + streaming slots
    lora: int
    activations: int
    reserve: int
    resident_blocks: tuple[int, ...] = ()
    streamed_blocks: tuple[int, ...] = ()
    host: int = 0  # host bytes: streamed blocks' pinned buffers + the process reserve

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.reserve

    def describe(self) -> str:
        where = (f"{len(self.streamed_blocks)} of {len(self.streamed_blocks) + len(self.resident_blocks)} blocks "
                 f"streamed (host {self.host / GiB:.2f} GiB), transformer on the device"
                 if self.streamed_blocks else "resident transformer")
        return (f"{where} {self.weights / GiB:.2f} GiB + LoRA/AdamW {self.lora / GiB:.2f} GiB + "
                f"activations {self.activations / GiB:.2f} GiB + reserve {self.reserve / GiB:.2f} GiB = "
                f"{self.total / GiB:.2f} GiB")


def lora_parameter_count(config, rank: int, per_block_shapes) -> int:
    return config.layers * sum(rank * (i + o) for i, o in per_block_shapes)


def training_plan(config, quant, *, rank: int, resolution: int, batch: int, text_tokens: int,
                  dtype: torch.dtype, budget_bytes: float | None, target_shapes, streamed: int = 0) -> TrainingPlan:
    """The plan with `streamed` blocks streamed (0: resident)."""
    w = sizes.transformer_weights(config, quant, dtype)
    streamed_ids = spread(streamed, config.layers)
    resident_ids = tuple(i for i in range(config.layers) if i not in streamed_ids)
    slots = min(PREFETCH + 1, len(streamed_ids)) * max((w.blocks[i] for i in streamed_ids), default=0)
    weights = w.fixed + sum(w.blocks[i] for i in resident_ids) + slots
    lora = 16 * lora_parameter_count(config, rank, target_shapes)
    image_tokens = (resolution // 16) ** 2
    s = torch.empty((), dtype=dtype).element_size()
    saved = config.layers * batch * (image_tokens + text_tokens) * config.features * s
    block = sizes.transformer_activation_bytes(config, batch, image_tokens, text_tokens, dtype, quant)
    scratch = config.mlpdim * config.features * 4
    reserve = 0 if budget_bytes is None else int(RESERVE_BYTES + RESERVE_FRACTION * budget_bytes)
    host = sum(w.pinned_streamed[i] for i in streamed_ids) + HOST_RESERVE_BYTES
    return TrainingPlan(weights, lora, saved + 2 * block + scratch, reserve, resident_ids, streamed_ids, host)


def _fitting(config, quant, budget: float, ram: float | None, **kwargs) -> TrainingPlan | None:
    """The fewest streamed blocks that fit the device budget (and the RAM one), or None."""
    for streamed in range(config.layers + 1):
        plan = training_plan(config, quant, budget_bytes=budget, streamed=streamed, **kwargs)
        if plan.total <= budget:
            return plan if ram is None or plan.host <= ram else None  # more streaming only needs more RAM
    return None


def _closest(config, quant, resolution: int, budget: float, ram: float | None, **kwargs) -> str:
    options = []
    for q in QUANT_LADDER:
        for res in range(resolution, 15, -64 if resolution > 64 else -16):
            plan = _fitting(config, q, budget, ram, resolution=res, **kwargs)
            if plan is not None:
                options.append((res != resolution, -res, QUANT_LADDER.index(q), q, res, plan))
                break
    if not options:
        return "nothing fits at any resolution ≥ 16, even streaming every block"
    *_, q, res, plan = min(options, key=lambda o: o[:3])
    return (f"closest fit: --quant {q or 'none'} --resolution {res} "
            f"({len(plan.streamed_blocks)} blocks streamed)")


def check_fits(config, quant, *, vram_gb: float | None, rank: int, resolution: int, batch: int,
               text_tokens: int, dtype: torch.dtype, target_shapes, ram_gb: float | None = None) -> TrainingPlan:
    """Resident when it fits, else the fewest streamed blocks that fit; or a MemoryPlanError naming the
    closest fit (a smaller quant, then a smaller resolution)."""
    budget = None if vram_gb is None else vram_gb * GiB
    ram = None if ram_gb is None else ram_gb * GiB
    kwargs = dict(rank=rank, batch=batch, text_tokens=text_tokens, dtype=dtype, target_shapes=target_shapes)
    if budget is None:
        return training_plan(config, quant, resolution=resolution, budget_bytes=None, **kwargs)
    plan = _fitting(config, quant, budget, ram, resolution=resolution, **kwargs)
    if plan is not None:
        return plan
    hint = _closest(config, quant, resolution, budget, ram, **kwargs)
    least = training_plan(config, quant, resolution=resolution, budget_bytes=budget, streamed=config.layers, **kwargs)
    if least.total > budget:
        raise MemoryPlanError(f"training does not fit {vram_gb} GB even streaming every block: {least.describe()}; "
                              f"{hint}", limit="device")
    first = next(training_plan(config, quant, resolution=resolution, budget_bytes=budget, streamed=n, **kwargs)
                 for n in range(config.layers + 1)
                 if training_plan(config, quant, resolution=resolution, budget_bytes=budget, streamed=n,
                                  **kwargs).total <= budget)
    raise MemoryPlanError(f"training fits {vram_gb} GB only with {len(first.streamed_blocks)} blocks streamed from "
                          f"host RAM, which needs {first.host / GiB:.2f} GiB (--ram-gb {ram_gb}): {first.describe()}; "
                          f"{hint}", limit="host")
