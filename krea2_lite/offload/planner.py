"""The memory planner: which transformer blocks stay on the GPU, which stream, where the text encoder
and the VAE run, and the device and host bytes that result. Pure arithmetic: nothing is allocated.

Device bytes, per phase of one generation:
  encode  text encoder + its activations (unless it runs on the CPU) + the resident transformer
          (unless it steps out for encoding) + VAE weights
  sample  resident transformer weights + streaming slots + step activations + VAE weights
          (+ the text encoder when it stays)
  decode  as sample with the VAE's activations instead of the step's
plus a reserve for the CUDA context and fragmentation.

Host bytes (RAM), per phase, are what the plan itself holds:
  always  the pinned copy of every streamed block (one flat buffer each); the pinned copy of a
          swapped text encoder and, when it steps out to encode, of the resident transformer (tensor
          by tensor); each pinned allocation counted as PyTorch's caching host allocator takes it,
          rounded up to a power of two (a 0.41 GiB int8 block takes 0.5 GiB); a text encoder kept on
          the CPU, counted whole (its pages are file-mapped only when it was loaded at the file's
          dtype, unquantized, so the plan cannot count on that)
  encode  + the CPU encoder's activations, or, for a text encoder re-read from its files ("reload"),
          its largest tensor in flight: the rest of what it reads is page cache, clean file pages the
          kernel drops under pressure, so it is not counted
plus HOST_RESERVE_BYTES for the process itself. Weights memory-mapped from safetensors files and then
moved to the device leave only page cache behind, so they are not counted either.

Preference order (the first placement that fits both budgets wins): everything on the device; then
the whole transformer resident with the text encoder swapped in to encode (the transformer stepping
out meanwhile if both don't fit), or re-read from its files; then the same with the fewest streamed
blocks; only then the text encoder on the CPU. By arithmetic (not yet timed on a GPU): a CFG call is
~9 TFLOP of Qwen3-VL-4B, tens of seconds for a desktop CPU, while a streamed block's copy (0.4–0.8
GiB per step over PCIe) is small beside that block's own compute at 1024², so more streaming is the
cheaper way out.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..config import Krea2Config
from ..checks import TEMPLATE_PREFIX_TOKENS, TEXT_ENCODER_PLACES, check_plan_request
from ..errors import ArgumentError, MemoryPlanError
from . import sizes

GiB = 1 << 30
# Outside PyTorch's allocator the card also holds the CUDA context and cuBLAS/Triton workspaces
# (~0.3–0.6 GiB), and the caching allocator fragments: keep this much of the budget free.
RESERVE_BYTES = GiB // 2
RESERVE_FRACTION = 0.04
# Host RAM the process needs besides the weights the plan places: the interpreter with torch,
# transformers and krea2_lite imported (~0.5 GiB RSS measured on CPU), the CUDA runtime's host side
# (context, cuBLAS/Triton state: ~0.5–1 GiB), the tokenizer, latents, images and allocator slack.
HOST_RESERVE_BYTES = 2 * GiB
VAE_TILE_PIXELS = 512  # the decoder's default tile (64 latents) in pixels


@dataclass(frozen=True)
class MemoryPlan:
    """Where every part of the pipeline lives during a generation, and what that costs."""

    mode: str  # "none" | "model" | "sequential" (what "auto" resolved to)
    budget_bytes: int  # the device memory the plan must fit (vram_gb)
    resident_blocks: tuple[int, ...]
    streamed_blocks: tuple[int, ...]
    prefetch: int  # streamed blocks copied ahead of the one computing
    text_encoder: str  # "device" (stays) | "swap" (in to encode, out after) | "reload" | "cpu"
    transformer_leaves_for_encoding: bool  # the resident transformer steps out while encoding
    vae_tile: int | None  # latent tile side, or None for a whole-image decode
    peak_bytes: int  # device peak: max over phases, reserve included
    host_bytes: int  # host RAM peak: max over host_phases, the process reserve included
    phases: dict = field(default_factory=dict)  # phase → device bytes
    parts: dict = field(default_factory=dict)  # what the phases are made of
    host_budget_bytes: int = 0  # the host RAM the plan was fitted to (host_ram_gb)
    host_phases: dict = field(default_factory=dict)  # phase → host bytes
    text_reload_bytes: int = 0  # bytes a call reads from the text encoder's files ("reload"), else 0

    @property
    def slots(self) -> int:
        return min(self.prefetch + 1, len(self.streamed_blocks))

    def __str__(self) -> str:
        budget = f"a {_gib(self.budget_bytes)} device" if self.budget_bytes else "no set device budget"
        lines = [f"memory plan '{self.mode}' for {budget} and {_gib(self.host_budget_bytes)} of host RAM: "
                 f"device peak {_gib(self.peak_bytes)}, host peak {_gib(self.host_bytes)}",
                 f"  transformer: {_blocks_words(self)}",
                 f"  text encoder: {_text_words(self)}"
                 + ("; the transformer steps out to host memory while it encodes"
                    if self.transformer_leaves_for_encoding else ""),
                 f"  VAE: on the device, {'tiles of %d latents' % self.vae_tile if self.vae_tile else 'whole image'}",
                 "  device: " + ", ".join(f"{name} {_gib(n)}" for name, n in self.phases.items()),
                 "  host:   " + ", ".join(f"{name} {_gib(n)}" for name, n in self.host_phases.items())]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _blocks_words(plan: MemoryPlan) -> str:
    total = len(plan.resident_blocks) + len(plan.streamed_blocks)
    words = f"{len(plan.resident_blocks)}/{total} blocks resident"
    if plan.streamed_blocks:
        words += (f", {len(plan.streamed_blocks)} streamed from pinned host memory through {plan.slots} slot(s) "
                  f"(prefetch {plan.prefetch}): {_ranges(plan.streamed_blocks)}")
    return words


def _text_words(plan: MemoryPlan) -> str:
    if plan.text_encoder == "reload":
        return (f"read from its files onto the device for each call and dropped after "
                f"({_gib(plan.text_reload_bytes)} read per call; page cache, not pinned RAM)")
    return {"device": "stays on the device", "swap": "moves to the device to encode, back to pinned host memory after",
            "cpu": "runs on the CPU, in host RAM"}[plan.text_encoder]


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


@dataclass(frozen=True)
class _Costs:
    """Every byte count a candidate placement is built from."""

    config: Krea2Config
    weights: sizes.TransformerWeights
    budget: int
    host_limit: int
    prefetch: int
    reserve: int
    host_reserve: int
    act: int                      # the transformer's activations
    text_encoder: int             # the text encoder's weights
    text_encoder_pinned: int      # its pinned host copy
    text_encoder_act: int         # its activations
    text_encoder_largest: int     # its largest tensor (in flight while a reload plan re-reads it)
    text_encoder_read: int        # what a reload plan reads from its files per call
    vae: int
    vae_act: dict                 # VAE activations by tile (None: untiled)
    extra: int                    # what else stays on the device (LoRA branches)


def plan_memory(config: Krea2Config, quant, vram_gb: float, width: int = 1024, height: int = 1024, *,
                mode: str = "auto", dtype: torch.dtype = torch.bfloat16, cfg: bool = True, num_images: int = 1,
                max_sequence_length: int = 512, text_encoder_bytes: int | None = None,
                vae_weight_bytes: int | None = None, text_encoder_shape: dict | None = None, vae_base_dim: int = 96,
                prefetch: int = 1, host_ram_gb: float | None = None, reserve_bytes: int | None = None,
                host_reserve_bytes: int = HOST_RESERVE_BYTES, extra_device_bytes: int = 0,
                text_encoder_place: str | None = None, text_encoder_reloadable: bool = True,
                text_encoder_read_bytes: int | None = None, text_encoder_pinned_bytes: int | None = None,
                text_encoder_quantized: bool = False) -> MemoryPlan:
    """Plan where the pipeline's parts live so one generation fits `vram_gb` GiB of device memory
    and `host_ram_gb` GiB of host RAM (default: what the OS reports available, MemAvailable).

    `quant`: None, "int8" | "fp8" | "int4" or a QuantSpec (weights counted exactly on a meta model).
    `cfg`: the transformer runs a doubled batch (guidance > 0). `text_encoder_bytes`: the loaded
    encoder's size (default: Qwen3-VL-4B's text path at `dtype`); `vae_weight_bytes` likewise
    (default: the Qwen-Image decoder at `dtype`); `text_encoder_shape` the encoder's sizes for its
    activations (keys as `sizes.QWEN3VL_4B_TEXT`; default Qwen3-VL-4B), `text_encoder_pinned_bytes` the
    host bytes of its pinned copy (default: from the shape, see `sizes.pinned_size`);
    `text_encoder_quantized` adds its dequantization scratch to its activations.
    `extra_device_bytes`: what else stays on the device through sampling and decoding (LoRA branches).
    `host_reserve_bytes`: host RAM kept for the process itself.

    `mode` "auto" returns the first placement, in the order the module docstring gives, that fits
    both budgets; a named mode searches only its own placements. `text_encoder_place` pins the text
    encoder's placement ("swap", "reload", "cpu"; "device" only with mode "none"); "reload" (drop
    after encoding, re-read from the files next call; `text_encoder_read_bytes` per call, default
    `text_encoder_bytes`) is considered only when `text_encoder_reloadable`. `vram_gb=None` plans a
    named mode in full (every block streamed for "sequential"). Raises MemoryPlanError when nothing
    fits, with `.limit` "device", "host" or "both" and the closest plan for each budget (also as
    `.closest_on_device` / `.closest_on_host`).
    """
    vram_gb, host_ram_gb = check_plan_request(mode, vram_gb, host_ram_gb, prefetch, text_encoder_place,
                                              text_encoder_reloadable)  # checks.py
    budget = int(vram_gb * GiB) if vram_gb is not None else 0
    if reserve_bytes is None:  # capped at a tenth so that tiny test budgets stay plannable
        reserve_bytes = min(RESERVE_BYTES + int(RESERVE_FRACTION * budget), budget // 10)
    image_tokens = math.ceil(height / 16) * math.ceil(width / 16)
    text_bytes = sizes.text_encoder_weight_bytes(dtype) if text_encoder_bytes is None else text_encoder_bytes
    if text_encoder_pinned_bytes is None:  # the shape's tensors, scaled to the encoder's actual bytes
        shape_bytes = sizes.text_encoder_weight_bytes(dtype, text_encoder_shape)
        text_encoder_pinned_bytes = math.ceil(sizes.text_encoder_pinned_bytes(dtype, text_encoder_shape)
                                              * text_bytes / shape_bytes)
    costs = _Costs(
        config=config, weights=sizes.transformer_weights(config, quant, dtype), budget=budget,
        host_limit=int(host_ram_gb * GiB) if host_ram_gb is not None else available_host_bytes(),
        prefetch=prefetch, reserve=reserve_bytes, host_reserve=host_reserve_bytes,
        act=sizes.transformer_activation_bytes(config, num_images * (2 if cfg else 1), image_tokens,
                                               max_sequence_length, dtype, quant),
        text_encoder=text_bytes, text_encoder_pinned=text_encoder_pinned_bytes,
        text_encoder_act=sizes.text_encoder_activation_bytes(2 if cfg else 1, max_sequence_length + TEMPLATE_PREFIX_TOKENS, dtype,
                                                   shape=text_encoder_shape, quantized=text_encoder_quantized),
        text_encoder_largest=min(text_bytes, sizes.text_encoder_largest_tensor_bytes(dtype, text_encoder_shape)),
        text_encoder_read=text_bytes if text_encoder_read_bytes is None else text_encoder_read_bytes,
        vae=sizes.vae_weight_bytes(dtype) if vae_weight_bytes is None else vae_weight_bytes,
        vae_act={tile: sizes.vae_activation_bytes(vae_base_dim, height, width, num_images, dtype,
                                                  None if tile is None else tile * 8)
                 for tile in (None, VAE_TILE_PIXELS // 8)},
        extra=extra_device_bytes)
    places = [p for p in TEXT_ENCODER_PLACES
              if text_encoder_place in (None, p) and (p != "reload" or text_encoder_reloadable)]
    kinds = ("none", "model", "sequential") if mode == "auto" else (mode,)
    candidates = list(_full(costs, mode, places) if vram_gb is None else _candidates(costs, kinds, places))
    if not candidates:
        raise ArgumentError(f"text_encoder_place={text_encoder_place!r} is not a placement of mode {mode!r}")
    for plan in candidates:
        if (vram_gb is None or plan.peak_bytes <= budget) and plan.host_bytes <= costs.host_limit:
            return plan
    raise _refusal(candidates, costs, vram_gb, mode, f"{width}×{height}{' with CFG' if cfg else ''}", quant)


def _build(c: _Costs, kind: str, streamed: int, text: str, leaves: bool, tile: int | None) -> MemoryPlan:
    n = c.config.layers
    blocks = c.weights.blocks
    streamed_ids = spread(streamed, n) if kind == "sequential" else ()
    resident_ids = tuple(i for i in range(n) if i not in streamed_ids)
    slots = min(c.prefetch + 1, len(streamed_ids))
    resident = c.weights.fixed + sum(blocks[i] for i in resident_ids) + c.extra
    slot_bytes = slots * max((blocks[i] for i in streamed_ids), default=0)
    text_stays = c.text_encoder if text == "device" else 0
    encode = (0 if text == "cpu" else c.text_encoder + c.text_encoder_act) + (0 if leaves else resident) + c.vae
    sample = resident + slot_bytes + c.act + c.vae + text_stays
    decode = resident + slot_bytes + c.vae + c.vae_act[tile] + text_stays
    phases = {"encode": encode + c.reserve, "sample": sample + c.reserve, "decode": decode + c.reserve}
    w = c.weights
    held = (sum(w.pinned_streamed[i] for i in streamed_ids) + {"swap": c.text_encoder_pinned, "cpu": c.text_encoder}.get(text, 0)
            + c.host_reserve)
    if leaves:  # the resident part's tensors, each pinned on its own (LoRA branches included)
        held += w.pinned_fixed + sum(w.pinned_swapped[i] for i in resident_ids) + c.extra
    in_flight = {"cpu": c.text_encoder_act, "reload": c.text_encoder_largest}.get(text, 0)
    host_phases = {"encode": held + in_flight, "sample": held, "decode": held}
    return MemoryPlan(mode=kind, budget_bytes=c.budget, resident_blocks=resident_ids, streamed_blocks=streamed_ids,
                      prefetch=c.prefetch, text_encoder=text, transformer_leaves_for_encoding=leaves, vae_tile=tile,
                      peak_bytes=max(phases.values()), host_bytes=max(host_phases.values()), phases=phases,
                      parts=dict(transformer_fixed=c.weights.fixed, block=max(blocks),
                                 transformer_total=c.weights.total, activations=c.act, text_encoder=c.text_encoder,
                                 text_encoder_activations=c.text_encoder_act,
                                 vae_weights=c.vae, vae_activations=c.vae_act[tile], reserve=c.reserve,
                                 extra=c.extra, slots=slot_bytes, host_reserve=c.host_reserve,
                                 text_encoder_pinned=c.text_encoder_pinned),
                      host_budget_bytes=c.host_limit, host_phases=host_phases,
                      text_reload_bytes=c.text_encoder_read if text == "reload" else 0)


def _candidates(c: _Costs, kinds: tuple[str, ...], places: list[str]):
    """Every placement of `kinds`, in preference order (see the module docstring)."""
    tiled = VAE_TILE_PIXELS // 8
    if "none" in kinds and "device" in places:
        for tile in (None, tiled):
            yield _build(c, "none", 0, "device", False, tile)
    on_device = [(t, leaves) for t, leaves in (("swap", False), ("swap", True), ("reload", False)) if t in places]
    for texts in (on_device, [("cpu", False)] if "cpu" in places else []):
        if "model" in kinds:
            for text, leaves in texts:
                for tile in (None, tiled):
                    yield _build(c, "model", 0, text, leaves, tile)
        if "sequential" in kinds:
            for streamed in range(1, c.config.layers + 1):  # fewest streamed blocks first
                for text, leaves in texts:
                    yield _build(c, "sequential", streamed, text, leaves, tiled)


def _full(c: _Costs, mode: str, places: list[str]):
    """No device budget: the named mode in full, the text encoder placed to spare host RAM if needed."""
    if mode == "none":
        if "device" in places:
            yield _build(c, "none", 0, "device", False, None)
        return
    streamed = c.config.layers if mode == "sequential" else 0
    tile = VAE_TILE_PIXELS // 8 if mode == "sequential" else None
    for text in ("swap", "reload", "cpu"):
        if text in places:
            yield _build(c, mode, streamed, text, False, tile)


def _refusal(candidates: list[MemoryPlan], c: _Costs, vram_gb, mode: str, shape: str, quant) -> MemoryPlanError:
    """Nothing fits both budgets: say which binds, and show the closest plan for each."""
    device_ok = [p for p in candidates if vram_gb is None or p.peak_bytes <= c.budget]
    host_ok = [p for p in candidates if p.host_bytes <= c.host_limit]
    least_device = min(host_ok or candidates, key=lambda p: p.peak_bytes)
    least_host = min(device_ok or candidates, key=lambda p: p.host_bytes)
    named = "" if mode == "auto" else repr(mode) + " "
    host = f"{c.host_limit / GiB:.2f} GiB of host RAM (host_ram_gb)"
    device = f"the {vram_gb:g} GiB device" if vram_gb is not None else "a device without a budget"
    device_need = (f"the plans that fit the host need at least {least_device.peak_bytes / GiB:.2f} GiB of device "
                   f"memory (transformer {c.weights.total / GiB:.2f} GiB{', ' + _quant_name(quant) if quant else ''})")
    host_need = (f"the plans that fit {device} need at least {least_host.host_bytes / GiB:.2f} GiB of host RAM "
                 f"({c.host_reserve / GiB:.2f} GiB of it the process reserve)")
    device_fix = "lower the resolution, use quant='int4', or turn CFG off"
    host_fix = "free RAM, quantize (quant='int8' or 'int4'), or allow more device memory (vram_gb)"
    if device_ok and not host_ok:
        error = MemoryPlanError(f"no {named}plan fits {host} at {shape}: {host_need}; {host_fix}\n"
                                f"closest on host memory:\n{least_host}", limit="host")
    elif host_ok and not device_ok:
        error = MemoryPlanError(f"no {named}plan fits {vram_gb:g} GiB at {shape}: the smallest needs "
                                f"{least_device.peak_bytes / GiB:.2f} GiB (transformer {c.weights.total / GiB:.2f} GiB"
                                f"{', ' + _quant_name(quant) if quant else ''}); {device_fix}\n"
                                f"closest on device memory:\n{least_device}", limit="device")
    else:
        either = "each budget alone could be met, not both" if device_ok else "neither budget can be met"
        error = MemoryPlanError(
            f"no {named}plan fits both {vram_gb:g} GiB of device memory and {host} at {shape} ({either}): "
            f"{device_need}, and {host_need}; {device_fix}, or {host_fix}\n"
            f"closest on device memory:\n{least_device}\nclosest on host memory:\n{least_host}", limit="both")
    # For callers that report the gap (krea2_lite/offload/plan_table.py): the plan needing the least device memory
    # among those that fit the host (all plans if none does), and the converse.
    error.closest_on_device, error.closest_on_host = least_device, least_host
    return error


def _quant_name(quant) -> str:
    return quant if isinstance(quant, str) else getattr(quant, "dtype", str(quant))
