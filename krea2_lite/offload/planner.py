"""The VRAM planner: which transformer blocks stay on the GPU, which stream, where the text encoder
and the VAE run, and the device / host bytes that result. Pure arithmetic: nothing is allocated.

Phases of one generation and what is on the device in each:
  encode  text encoder (unless it runs on the CPU) + the resident transformer (unless it steps out
          for encoding) + VAE weights + encoder activations
  sample  resident transformer weights + streaming slots + step activations + VAE weights
          (+ the text encoder when it stays)
  decode  as sample without the streaming slots' activations: VAE activations instead
The plan's peak is the largest phase plus a fixed reserve for the CUDA context and fragmentation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..config import Krea2Config
from ..errors import MemoryPlanError
from . import sizes

GiB = 1 << 30
MODES = ("none", "model", "sequential", "auto")
TEXT_PLACES = ("device", "swap", "cpu")
# Outside PyTorch's allocator the card also holds the CUDA context and cuBLAS/Triton workspaces
# (~0.3–0.6 GiB), and the caching allocator fragments: keep this much of the budget free.
RESERVE_BYTES = GiB // 2
RESERVE_FRACTION = 0.04
VAE_TILE_PIXELS = 512  # the decoder's default tile (64 latents) in pixels


@dataclass(frozen=True)
class MemoryPlan:
    """Where every part of the pipeline lives during a generation, and what that costs."""

    mode: str  # "none" | "model" | "sequential" (what "auto" resolved to)
    budget_bytes: int  # the device memory the plan must fit (vram_gb)
    resident_blocks: tuple[int, ...]
    streamed_blocks: tuple[int, ...]
    prefetch: int  # streamed blocks copied ahead of the one computing
    text_encoder: str  # "device" (stays) | "swap" (in for encoding, out after) | "cpu"
    transformer_leaves_for_encoding: bool  # the resident transformer steps out while encoding
    vae_tile: int | None  # latent tile side, or None for a whole-image decode
    peak_bytes: int  # device peak: max over phases, reserve included
    host_bytes: int  # pinned host memory the plan holds
    phases: dict = field(default_factory=dict)  # phase → device bytes
    parts: dict = field(default_factory=dict)  # what the phases are made of

    @property
    def slots(self) -> int:
        return min(self.prefetch + 1, len(self.streamed_blocks))

    def __str__(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GiB:.2f} GiB"

        blocks = len(self.resident_blocks) + len(self.streamed_blocks)
        budget = f"a {gib(self.budget_bytes)} device" if self.budget_bytes else "no set budget"
        lines = [f"memory plan '{self.mode}' for {budget}: peak {gib(self.peak_bytes)}, "
                 f"host {gib(self.host_bytes)}",
                 f"  transformer: {len(self.resident_blocks)}/{blocks} blocks resident"
                 + (f", {len(self.streamed_blocks)} streamed through {self.slots} slot(s) (prefetch "
                    f"{self.prefetch}): {_ranges(self.streamed_blocks)}" if self.streamed_blocks else ""),
                 f"  text encoder: {_TEXT_WORDS[self.text_encoder]}"
                 + ("; the transformer steps out to host memory while it encodes"
                    if self.transformer_leaves_for_encoding else ""),
                 f"  VAE: on the device, {'tiles of %d latents' % self.vae_tile if self.vae_tile else 'whole image'}"]
        lines += [f"  {name:<7} {gib(n)}" for name, n in self.phases.items()]
        return "\n".join(lines)


_TEXT_WORDS = {"device": "stays on the device", "swap": "moves to the device to encode, back to host after",
               "cpu": "runs on the CPU"}


def _ranges(blocks: tuple[int, ...]) -> str:
    return ", ".join(str(b) for b in blocks) if len(blocks) <= 12 else f"{len(blocks)} blocks spread over the stack"


def spread(count: int, total: int) -> tuple[int, ...]:
    """`count` block indices spread evenly over 0..total-1 (streamed blocks between resident ones
    give each copy more compute to hide behind)."""
    if count <= 0:
        return ()
    return tuple(sorted({min(total - 1, math.floor((i + 0.5) * total / count)) for i in range(count)}))


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_memory(config: Krea2Config, quant, vram_gb: float, width: int = 1024, height: int = 1024, *,
                mode: str = "auto", dtype: torch.dtype = torch.bfloat16, cfg: bool = True, num_images: int = 1,
                max_sequence_length: int = 512, text_encoder_bytes: int | None = None,
                vae_weight_bytes: int | None = None, text_encoder_shape: dict | None = None, vae_base_dim: int = 96, prefetch: int = 1,
                host_ram_gb: float | None = None, reserve_bytes: int | None = None,
                extra_device_bytes: int = 0) -> MemoryPlan:
    """Plan where the pipeline's parts live so one generation fits `vram_gb` GiB of device memory.

    `quant`: None, "int8" | "fp8" | "int4" or a QuantSpec (weights counted exactly on a meta model).
    `cfg`: the transformer runs a doubled batch (guidance > 0). `text_encoder_bytes`: the loaded
    encoder's size (default: Qwen3-VL-4B's text path at `dtype`); `vae_weight_bytes` likewise
    (default: the Qwen-Image decoder at `dtype`); `text_encoder_shape` the encoder's sizes for its
    activations (keys as `sizes.QWEN3VL_4B_TEXT`; default Qwen3-VL-4B). `extra_device_bytes`: what
    else stays on the device through sampling and decoding (LoRA branches). `mode` "auto" picks the first
    of none → model → sequential that fits; a named mode is planned as asked and refused when it
    cannot fit. Raises MemoryPlanError when nothing fits the device or the pinned host memory
    exceeds `host_ram_gb` (default: what the OS reports available).
    """
    if mode not in MODES:
        raise ValueError(f"offload mode must be one of {MODES}, got {mode!r}")
    if vram_gb is None and mode == "auto":
        raise ValueError("vram_gb=None needs a named mode ('none', 'model', 'sequential'): 'auto' plans to a budget")
    from ..arguments import check_gib  # finite, positive, ≤ 1 PiB: inf overflowed int(vram_gb * GiB)

    vram_gb, host_ram_gb = check_gib("vram_gb", vram_gb), check_gib("host_ram_gb", host_ram_gb)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
    budget = int(vram_gb * GiB) if vram_gb is not None else 0
    if reserve_bytes is None:  # capped at a tenth so that tiny test budgets stay plannable
        reserve_bytes = min(RESERVE_BYTES + int(RESERVE_FRACTION * budget), budget // 10)
    reserve = reserve_bytes
    weights = sizes.transformer_weights(config, quant, dtype)
    batch = num_images * (2 if cfg else 1)
    image_tokens = math.ceil(height / 16) * math.ceil(width / 16)
    text_tokens = max_sequence_length
    act = sizes.transformer_activation_bytes(config, batch, image_tokens, text_tokens, dtype, quant)
    if vae_weight_bytes is None:
        vae_weight_bytes = sizes.vae_weight_bytes(dtype)
    te_bytes = sizes.text_encoder_weight_bytes(dtype) if text_encoder_bytes is None else text_encoder_bytes
    te_act = sizes.text_encoder_activation_bytes(2 if cfg else 1, max_sequence_length + 34, dtype,
                                                 shape=text_encoder_shape)
    vae_act = {tile: sizes.vae_activation_bytes(vae_base_dim, height, width, num_images, dtype,
                                                None if tile is None else tile * 8)
               for tile in (None, VAE_TILE_PIXELS // 8)}
    host_limit = int(host_ram_gb * GiB) if host_ram_gb is not None else available_host_bytes()
    parts = dict(transformer_fixed=weights.fixed, block=max(weights.blocks), transformer_total=weights.total,
                 activations=act, text_encoder=te_bytes, text_encoder_activations=te_act,
                 vae_weights=vae_weight_bytes, vae_activations=vae_act[None], reserve=reserve,
                 extra=extra_device_bytes)

    def build(kind: str, streamed: int, text: str, leaves: bool, tile: int | None) -> MemoryPlan:
        n = config.layers
        streamed_ids = spread(streamed, n) if kind == "sequential" else ()
        resident_ids = tuple(i for i in range(n) if i not in streamed_ids)
        slots = min(prefetch + 1, len(streamed_ids))
        resident = weights.fixed + sum(weights.blocks[i] for i in resident_ids) + extra_device_bytes
        slot_bytes = slots * max((weights.blocks[i] for i in streamed_ids), default=0)
        te_on_device = te_bytes if text == "device" else 0
        encode = (0 if text == "cpu" else te_bytes + te_act) + (0 if leaves else resident) + vae_weight_bytes
        sample = resident + slot_bytes + act + vae_weight_bytes + te_on_device
        decode = resident + slot_bytes + vae_weight_bytes + vae_act[tile] + te_on_device
        phases = {"encode": encode + reserve, "sample": sample + reserve, "decode": decode + reserve}
        host = (te_bytes if text != "device" else 0) + sum(weights.blocks[i] for i in streamed_ids)
        host += resident if leaves else 0
        return MemoryPlan(mode=kind, budget_bytes=budget, resident_blocks=resident_ids,
                          streamed_blocks=streamed_ids, prefetch=prefetch, text_encoder=text,
                          transformer_leaves_for_encoding=leaves, vae_tile=tile,
                          peak_bytes=max(phases.values()), host_bytes=host, phases=phases,
                          parts=dict(parts, vae_activations=vae_act[tile], slots=slot_bytes))

    def candidates(kind: str):
        if kind == "none":
            for tile in (None, VAE_TILE_PIXELS // 8):
                yield build("none", 0, "device", False, tile)
            return
        texts = [("swap", False), ("swap", True), ("cpu", False)]
        if kind == "model":
            for text, leaves in texts:
                for tile in (None, VAE_TILE_PIXELS // 8):
                    yield build("model", 0, text, leaves, tile)
            return
        for streamed in range(1, config.layers + 1):  # fewest streamed blocks first
            for text, leaves in texts:
                yield build("sequential", streamed, text, leaves, VAE_TILE_PIXELS // 8)

    if vram_gb is None:  # no budget: the named mode in full (every block streamed for "sequential")
        plan = {"none": lambda: build("none", 0, "device", False, None),
                "model": lambda: build("model", 0, "swap", False, None),
                "sequential": lambda: build("sequential", config.layers, "swap", False, VAE_TILE_PIXELS // 8)}[mode]()
        return _check_host(plan, host_limit, "no budget")
    kinds = ("none", "model", "sequential") if mode == "auto" else (mode,)
    smallest = None
    for kind in kinds:
        for plan in candidates(kind):
            if smallest is None or plan.peak_bytes < smallest.peak_bytes:
                smallest = plan
            if plan.peak_bytes <= budget:
                return _check_host(plan, host_limit, f"{vram_gb:g} GiB")
    raise MemoryPlanError(
        f"no {'' if mode == 'auto' else repr(mode) + ' '}plan fits {vram_gb:g} GiB at {width}×{height}"
        f"{' with CFG' if cfg else ''}: the smallest needs {smallest.peak_bytes / GiB:.2f} GiB "
        f"(transformer {weights.total / GiB:.2f} GiB{', ' + _quant_name(quant) if quant else ''}). "
        "Lower the resolution, use quant='int4', or turn CFG off\n" + str(smallest))


def _check_host(plan: MemoryPlan, host_limit: int, budget: str) -> MemoryPlan:
    if plan.host_bytes > host_limit:
        raise MemoryPlanError(
            f"the '{plan.mode}' plan for {budget} needs {plan.host_bytes / GiB:.2f} GiB of host memory for the "
            f"offloaded weights but only {host_limit / GiB:.2f} GiB is available; free RAM, quantize "
            f"(quant='int8' or 'int4'), or allow more device memory (vram_gb)\n{plan}", limit="host")
    return plan


def _quant_name(quant) -> str:
    return quant if isinstance(quant, str) else getattr(quant, "dtype", str(quant))
