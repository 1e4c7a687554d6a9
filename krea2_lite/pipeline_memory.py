"""The memory side of `Krea2Pipeline`'s loading: the exact bytes and shapes of its loaded components,
whether `from_pretrained` plans at all, the card's budget, and the load-time plan (each call re-plans
for its own size in `Krea2Pipeline._fit_plan`)."""

from __future__ import annotations

import logging

import torch

from .errors import MemoryPlanError
from .loading.pipeline import PipelineSpec
from .offload import plan_memory
from .offload.sizes import module_pinned_bytes
from .variants import VARIANTS

logger = logging.getLogger("krea2_lite")


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of a loaded module."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def text_encoder_shape(encoder) -> dict:
    """The sizes the planner needs for the encoder's activations, from its own config."""
    c = encoder.config
    return dict(hidden=c.hidden_size, intermediate=c.intermediate_size, heads=c.num_attention_heads,
                kvheads=c.num_key_value_heads, headdim=getattr(c, "head_dim", None) or c.hidden_size //
                c.num_attention_heads, vocab=c.vocab_size, layers=c.num_hidden_layers)


def first_plan(spec: PipelineSpec, budget: float | None, offload: str, encoder, decoder, *, dtype, prefetch,
                host_ram_gb):
    """The load-time plan, for the model's default size (every call re-plans for its own, see _fit_plan);
    when the budget cannot hold that size, every block streamed until a call's size says otherwise."""
    sizes = dict(dtype=dtype, cfg=VARIANTS[spec.variant].guidance > 0, text_encoder_bytes=tensor_bytes(encoder),
                 vae_weight_bytes=tensor_bytes(decoder), vae_base_dim=decoder.config.base_dim,
                 text_encoder_shape=text_encoder_shape(encoder), prefetch=prefetch, host_ram_gb=host_ram_gb,
                 text_encoder_reloadable=True, text_encoder_pinned_bytes=module_pinned_bytes(encoder),
                 text_encoder_quantized=encoder.quant_spec is not None)
    try:
        plan = plan_memory(spec.config, spec.quant, budget, *spec.default_size, mode=offload, **sizes)
    except MemoryPlanError as exc:
        if exc.limit != "device" or budget is None:
            raise
        plan = plan_memory(spec.config, spec.quant, None, mode="sequential", **sizes)
        logger.warning("krea2_lite: %s GiB cannot hold a %d×%d generation; every block will be streamed "
                       "until a call's size says otherwise", f"{budget:.2f}", *spec.default_size)
    logger.info("krea2_lite: %s", plan)
    return plan


def plans_memory(offload: str, device: torch.device, vram_gb: float | None) -> bool:
    """Whether from_pretrained runs the offload planner: any mode but "none", except "auto" on a
    non-CUDA device without a vram_gb budget (nothing to fit there)."""
    return offload != "none" and not (offload == "auto" and device.type != "cuda" and vram_gb is None)


def budget_gib(vram_gb: float | None, device: torch.device) -> float | None:
    """The plan's budget: vram_gb, else what CUDA reports free on `device`, else none (CPU)."""
    if vram_gb is not None or device.type != "cuda":
        return vram_gb
    free, _ = torch.cuda.mem_get_info(device)
    return free / (1 << 30)


def placement(plan) -> tuple:
    """What a plan decides about where things live (two plans with equal placements need no re-apply)."""
    return (plan.mode, plan.resident_blocks, plan.streamed_blocks, plan.text_encoder,
            plan.transformer_leaves_for_encoding, plan.vae_tile, plan.prefetch)
