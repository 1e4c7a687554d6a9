"""The training memory plan: device bytes of one LoRA step with the transformer resident, from the
inference planner's exact weight counts (`offload.sizes`), refused before any work when it does
not fit, naming the closest setting that does.

Counted: the transformer's weights (exact, per quant string); the LoRA's float32 parameters,
gradients and AdamW's two moments (4 × 4 bytes per parameter); activations with per-block
checkpointing: every block's input kept (layers · B·L·f·s), one block recomputed with everything
its backward needs (2 × its widest forward point, `transformer_activation_bytes`, a bound), the
dequantized float32 weight of the layer in backward, and the reserve of the inference planner.
Streaming blocks in the forward and backward order is NOT implemented yet: a model that does not fit
resident is refused with the closest resident fit (a smaller resolution or a smaller quant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MemoryPlanError
from ..offload import sizes
from ..offload.planner import RESERVE_BYTES, RESERVE_FRACTION

GiB = 1 << 30
QUANT_LADDER = (None, "fp8", "int8", "int4")


@dataclass(frozen=True)
class TrainingPlan:
    weights: int
    lora: int
    activations: int
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.reserve

    def describe(self) -> str:
        return (f"resident transformer {self.weights / GiB:.2f} GiB + LoRA/AdamW {self.lora / GiB:.2f} GiB + "
                f"activations {self.activations / GiB:.2f} GiB + reserve {self.reserve / GiB:.2f} GiB = "
                f"{self.total / GiB:.2f} GiB")


def lora_parameter_count(config, rank: int, per_block_shapes) -> int:
    return config.layers * sum(rank * (i + o) for i, o in per_block_shapes)


def training_plan(config, quant, *, rank: int, resolution: int, batch: int, text_tokens: int,
                  dtype: torch.dtype, budget_bytes: float | None, target_shapes) -> TrainingPlan:
    weights = sizes.transformer_weights(config, quant, dtype).total
    lora = 16 * lora_parameter_count(config, rank, target_shapes)
    image_tokens = (resolution // 16) ** 2
    s = torch.empty((), dtype=dtype).element_size()
    saved = config.layers * batch * (image_tokens + text_tokens) * config.features * s
    block = sizes.transformer_activation_bytes(config, batch, image_tokens, text_tokens, dtype, quant)
    scratch = config.mlpdim * config.features * 4
    reserve = 0 if budget_bytes is None else int(RESERVE_BYTES + RESERVE_FRACTION * budget_bytes)
    return TrainingPlan(weights, lora, saved + 2 * block + scratch, reserve)


def check_fits(config, quant, *, vram_gb: float | None, rank: int, resolution: int, batch: int,
               text_tokens: int, dtype: torch.dtype, target_shapes) -> TrainingPlan:
    """The resident plan, or a MemoryPlanError naming the closest resident fit."""
    budget = None if vram_gb is None else vram_gb * GiB
    kwargs = dict(rank=rank, batch=batch, text_tokens=text_tokens, dtype=dtype, target_shapes=target_shapes)
    plan = training_plan(config, quant, resolution=resolution, budget_bytes=budget, **kwargs)
    if budget is None or plan.total <= budget:
        return plan
    options = []
    for q in QUANT_LADDER:
        for res in range(resolution, 15, -64 if resolution > 64 else -16):
            candidate = training_plan(config, q, resolution=res, budget_bytes=budget, **kwargs)
            if candidate.total <= budget:
                options.append((res != resolution, -res, QUANT_LADDER.index(q), q, res))
                break
    hint = "nothing fits resident at any resolution ≥ 16 (streamed training is not implemented yet)"
    if options:
        _, _, _, q, res = min(options)
        hint = f"closest resident fit: --quant {q or 'none'} --resolution {res}"
    raise MemoryPlanError(f"training does not fit {vram_gb} GB: {plan.describe()}; {hint}")
