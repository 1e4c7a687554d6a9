"""Krea2Pipeline: holds the three components and turns prompts into PIL images.

The pipeline is thin: argument checks, prompt encoding, noise, then `sampling.denoise` and the
VAE. Noise is drawn on the CPU with a torch.Generator seeded `seed + i` for image i, so a seed
gives the same image on any device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import checks, images_in, inpaint
from .errors import ArgumentTypeError, DeviceMemoryError, MemoryPlanError, ShapeMismatchError
from .finite_checks import check_decoded, check_schedule
from .kernels import backend_scope
from .kernels.dispatch import kernel_backend
from .kernels.workspace import release_workspaces
from .loading.pipeline import DEFAULT_TEXT_ENCODER, DEFAULT_VAE, PipelineSpec, resolve_pipeline  # noqa: F401
from .loading.text_encoder import load_text_encoder
from .loading.transformer import load_transformer
from .loading.vae import load_vae_decoder
from .loading.vae_encoder import load_vae_encoder
from .lora import lora_bytes
from .offload.planner import available_host_bytes
from .offload import plan_memory
from .offload.sizes import module_pinned_bytes, vae_encoder_weight_bytes
from .offload.image_encoder import ImageEncoderPlacement
from .offload.apply_plan import Offloader
from .pipeline_memory import budget_gib, first_plan, placement, plans_memory, tensor_bytes, text_encoder_shape
from .files.dtypes import check_float_dtype
from .sampling import DEFAULT_SHIFT, compact_text, denoise, pack_latents, resolution_mu, sigmas, unpack_latents
from .variants import VARIANTS, VariantDefaults

logger = logging.getLogger("krea2_lite")

REPLAN_FACTOR = 0.8  # after a CUDA out-of-memory error, plan again for this share of the last peak


@dataclass
class Krea2Output:
    images: list  # PIL.Image.Image, prompt-major: prompt 0 images 0..n-1, then prompt 1, ...
    latents: torch.Tensor  # final latents, unpacked (N, channels, H/8, W/8)
    # One dict per image: the settings that reproduce it (krea2_lite.metadata; save with save_png).
    metadata: list = field(default_factory=list)
    # Transformer block evaluations this call ran, and how many an uncached call runs (steps × blocks);
    # they differ only with a step cache (`cache=`).
    block_evaluations: int | None = None
    block_evaluations_total: int | None = None


class Krea2Pipeline:
    def __init__(self, transformer, text_encoder, vae, *, variant: str = "raw",
                 shift: dict | None = None, vae_tile: int | str | None = "auto",
                 defaults: VariantDefaults | None = None, default_size: tuple[int, int] = (1024, 1024)):
        checks.check_variant(variant, optional=False)
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.variant = variant
        self.defaults = defaults or VARIANTS[variant]
        self.default_size = default_size  # (width, height) when __call__ is given none
        self.shift = dict(DEFAULT_SHIFT, **(shift or {}))
        self.vae_tile = vae_tile
        self.offloader = None  # set by apply_plan
        self.memory_plan = None
        self.plan_request = None  # {"vram_gb", "mode", "host_ram_gb"} when from_pretrained planned
        self.text_encoder_loader = None  # re-reads the text encoder from its files (a "reload" plan needs it)
        self._device = None
        self.source = None  # what from_pretrained was given (a path, hub id or "demo"), for image metadata
        self.revision = None  # the hub commit the model was loaded at, for image metadata
        self.vae_encoder = None  # images in: the VAE encoder, read on the first call given an image
        self.vae_encoder_loader = None  # () -> encoder on the host; set by from_spec
        self._encoder_placement = None

    @property
    def device(self) -> torch.device:
        """Where the transformer computes (with offloading, its weights may sit on the host between uses)."""
        return self._device if self._device is not None else self.transformer.first.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.compute_dtype

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike | None = None, *, variant: str | None = None,
                        quant=None, vram_gb: float | None = None, offload: str = "auto",
                        device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                        transformer: str | os.PathLike | None = None,
                        text_encoder: str | os.PathLike | None = None,
                        vae: str | os.PathLike | None = None, progress: bool | None = None,
                        prefetch: int = 1, host_ram_gb: float | None = None,
                        revision: str | None = None) -> "Krea2Pipeline":
        """Load a pipeline from a diffusers folder (model_index.json), a hub id, or explicit paths.

        `path_or_hub_id` may also be a single transformer file (official or ComfyUI); the text
        encoder and VAE then come from `text_encoder=` / `vae=` or the released defaults
        (Qwen/Qwen3-VL-4B-Instruct, Qwen/Qwen-Image's vae/). `variant` "raw" / "turbo" picks the
        sampling defaults; None reads diffusers' `is_distilled` from the folder and otherwise
        assumes "raw" (log line says so). `device=None` picks CUDA when present. The transformer
        named is checked before the default text encoder / VAE are resolved (or downloaded).

        Memory: `offload` "none" puts everything on `device`; "model" / "sequential" / "auto" plan
        with `krea2_lite.offload.plan_memory` for `vram_gb` GiB (default: the free CUDA memory;
        on the CPU "auto" means "none"), streaming blocks with `prefetch` copies in flight, and for
        `host_ram_gb` GiB of host RAM (default: what the OS reports available now, MemAvailable). The
        plan is `pipe.memory_plan`; each call re-plans for its own size when that changes it.

        Hub ids (`owner/name`, or one file: `owner/name/path/in/repo.safetensors`, also for
        `transformer=` / `text_encoder=` / `vae=`) are fetched by need (`krea2_lite.files.hub_fetch`);
        `revision` (branch, tag or commit) pins the model's repo, and `pipe.revision` is the commit loaded.
        """
        checks.check_offload(offload)
        for name, value in (("path_or_hub_id", path_or_hub_id), ("transformer", transformer),
                            ("text_encoder", text_encoder), ("vae", vae)):
            checks.check_path_argument(name, value)
        checks.check_prefetch(prefetch)
        kernel_backend()  # KREA2_LITE_KERNELS checked before anything loads
        checks.check_gib("vram_gb", vram_gb)  # finite, positive: inf overflowed int(vram_gb * GiB)
        checks.check_variant(variant)
        checks.check_gib("host_ram_gb", host_ram_gb)
        if revision is not None and not isinstance(revision, str):
            raise ArgumentTypeError(f"revision must be a branch, tag or commit hash (a string), got {revision!r}")
        dtype = check_float_dtype(dtype)
        device = checks.check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if host_ram_gb is not None and not plans_memory(offload, device, vram_gb):
            # No option is silently without effect: a host budget only steers the offload planner.
            warnings.warn(f"host_ram_gb={host_ram_gb} has no effect: nothing is planned on {device.type} with "
                          f"offload={offload!r} and no vram_gb (the planner runs for a GPU or a given vram_gb)",
                          UserWarning, stacklevel=2)
        if host_ram_gb is None:  # read before anything is loaded: the plan counts what the pipeline will hold
            host_ram_gb = available_host_bytes() / (1 << 30)
        spec = resolve_pipeline(path_or_hub_id, variant=variant, quant=quant, transformer=transformer,
                                text_encoder=text_encoder, vae=vae, revision=revision, progress=progress is not False)
        pipe = cls.from_spec(spec, quant=quant, vram_gb=vram_gb, offload=offload, device=device, dtype=dtype,
                             progress=progress, prefetch=prefetch, host_ram_gb=host_ram_gb)
        # What the user named (a path, hub id or "demo"), recorded in every image's metadata.
        pipe.source = os.fspath(path_or_hub_id if path_or_hub_id is not None else transformer or "") or None
        pipe.revision = spec.revision  # the hub commit actually loaded (None for a local model)
        # A transformer that replaced the pipeline's own (a GGUF or ComfyUI file): recorded beside it.
        pipe.transformer_source = os.fspath(transformer) if transformer is not None and path_or_hub_id is not None \
            else None
        return pipe

    @classmethod
    def from_spec(cls, spec: PipelineSpec, *, quant=None, vram_gb: float | None = None, offload: str = "auto",
                  device: torch.device, dtype: torch.dtype = torch.bfloat16, progress: bool | None = None,
                  prefetch: int = 1, host_ram_gb: float | None = None) -> "Krea2Pipeline":
        """Load what `resolve_pipeline` described: text encoder and VAE, the memory plan, then the
        transformer, each block straight where the plan puts it."""
        # With offloading, the text encoder and the VAE are loaded to the host first: the plan needs
        # their exact sizes, and decides where they live.
        planned = plans_memory(offload, device, vram_gb)
        load_device = torch.device("cpu") if planned else device
        encoder = load_text_encoder(spec.text_encoder, device=load_device, dtype=dtype, select_layers=spec.select_layers)
        # On the CPU the VAE runs in float32: bf16 convolutions there are many times slower
        # (no native bf16 on most desktop CPUs), and the decoder is small.
        decoder = load_vae_decoder(spec.vae, device=load_device, dtype=dtype if device.type == "cuda" else torch.float32)
        if spec.config.channels != decoder.config.z_dim:
            raise ShapeMismatchError(f"the transformer works on {spec.config.channels} latent channels but the "
                                     f"VAE at {spec.vae} has z_dim={decoder.config.z_dim}")
        plan, budget, device_blocks = None, None, None
        if planned:
            budget = budget_gib(vram_gb, device)
            plan = first_plan(spec, budget, offload, encoder, decoder, dtype=dtype, prefetch=prefetch,
                               host_ram_gb=host_ram_gb)
            device_blocks = plan.resident_blocks  # the others go to host memory, where the plan streams them from
        model = load_transformer(spec.transformer, device=device, dtype=dtype, quant=quant, progress=progress,
                                 device_blocks=device_blocks)
        pipe = cls(model, encoder, decoder, variant=spec.variant, shift=spec.shift, defaults=spec.defaults,
                   default_size=spec.default_size)
        pipe.text_encoder_loader = functools.partial(load_text_encoder, spec.text_encoder, dtype=dtype,
                                                     select_layers=spec.select_layers)
        pipe.vae_encoder_loader = functools.partial(load_vae_encoder, spec.vae, dtype=decoder.dtype)
        if plan is not None:
            pipe.apply_plan(plan, device)
            pipe.plan_request = dict(vram_gb=budget, mode=offload, host_ram_gb=host_ram_gb)
        return pipe

    # ---- memory placement ------------------------------------------------------------------
    def plan(self, vram_gb: float | None, *, mode: str = "auto", width: int = 1024, height: int = 1024,
             cfg: bool | None = None, num_images: int = 1, prefetch: int = 1, max_sequence_length: int = 512,
             host_ram_gb: float | None = None, text_encoder_place: str | None = None,
             extra_device_bytes: int = 0, image_in: bool = False):
        """A MemoryPlan for this pipeline's components (their exact sizes) and one call's shape;
        `host_ram_gb` defaults to the one from_pretrained planned for, else what the OS reports;
        `extra_device_bytes` (a step cache's residuals) is added to the LoRA branches';
        `image_in`: the call encodes an input image (the plan's "image" phase counts the VAE encoder)."""
        if host_ram_gb is None:
            host_ram_gb = (self.plan_request or {}).get("host_ram_gb")
        quantization = getattr(self.transformer, "quantization", None)
        # A community file kept as stored (GGUF, ComfyUI) is counted by its stored bytes.
        quant = getattr(self.transformer, "stored_format", None) or (quantization.spec if quantization else None)
        return plan_memory(self.transformer.config, quant, vram_gb,
                           width, height, mode=mode, dtype=self.dtype,
                           cfg=self.defaults.guidance > 0 if cfg is None else cfg, num_images=num_images,
                           text_encoder_bytes=tensor_bytes(self.text_encoder),
                           vae_weight_bytes=tensor_bytes(self.vae), vae_base_dim=self.vae.config.base_dim,
                           prefetch=prefetch, max_sequence_length=max_sequence_length,
                           text_encoder_shape=text_encoder_shape(self.text_encoder),
                           extra_device_bytes=lora_bytes(self.transformer) + extra_device_bytes,
                           host_ram_gb=host_ram_gb,
                           text_encoder_place=text_encoder_place,
                           text_encoder_reloadable=self.text_encoder_loader is not None,
                           text_encoder_pinned_bytes=module_pinned_bytes(self.text_encoder),
                           text_encoder_quantized=self.text_encoder.quant_spec is not None,
                           image_encoder_bytes=vae_encoder_weight_bytes(self.vae.dtype, self.vae.config)
                           if image_in else None)

    def apply_plan(self, plan, device: str | torch.device | None = None) -> None:
        """Place the components as `plan` says (undoing any previous plan first)."""
        device = torch.device(device) if device is not None else self.device
        if self.offloader is not None:
            self.offloader.release()
            self.offloader = None
        self.offloader = Offloader(self.transformer, self.text_encoder, self.vae, plan, device,
                                   text_loader=self.text_encoder_loader)
        self.memory_plan, self._device = plan, device

    def _fit_plan(self, width: int, height: int, cfg: bool, images: int, max_sequence_length: int,
                  extra: int = 0, image_in: bool = False) -> None:
        """Re-plan for this call's shape when the pipeline was planned to a budget and the placement changes
        (a larger image or batch may need more blocks streamed; a smaller one may need fewer)."""
        request = self.plan_request
        if self.memory_plan is None or request is None or request["vram_gb"] is None:
            return
        plan = self.plan(request["vram_gb"], mode=request["mode"], width=width, height=height, cfg=cfg,
                         num_images=images, prefetch=self.memory_plan.prefetch,
                         max_sequence_length=max_sequence_length, extra_device_bytes=extra, image_in=image_in)
        if placement(plan) != placement(self.memory_plan):
            logger.info("krea2_lite: re-planning for %d image(s) at %d×%d:\n%s", images, width, height, plan)
            self.apply_plan(plan, self.device)
        self.memory_plan = plan

    # ---- LoRA (krea2_lite.lora on the transformer) ------------------------------------------
    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None, *,
                  merge: bool = False) -> str:
        """Apply a LoRA file to the transformer as an unmerged branch; returns its name.

        A and B go to the compute device even when the memory plan keeps blocks on the host; the
        next call's plan counts them (`krea2_lite.lora.lora_bytes`). merge=True needs a pipeline without a memory plan (offload="none"): a plan may
        stream or swap the weights from host copies that would not see the merge.
        """
        from .errors import LoraError
        from .lora import load_lora

        if merge and self.offloader is not None:
            raise LoraError(f"{path}: merge=True is not available while a memory plan ('{self.memory_plan.mode}') "
                            "places the transformer; load it unmerged (merge=False), or load the pipeline with "
                            "offload='none'")
        loaded = load_lora(self.transformer, path, scale=scale, name=name, merge=merge, device=self.device)
        self.lora_files = {**getattr(self, "lora_files", {}), loaded: os.fspath(path)}  # the PNG records path + size
        return loaded

    def set_lora_scale(self, scale: float, name: str | None = None) -> None:
        from .lora import set_lora_scale

        set_lora_scale(self.transformer, scale, name)

    def unload_lora(self, name: str | None = None) -> None:
        from .lora import unload_lora

        unload_lora(self.transformer, name)

    # ---- generation ------------------------------------------------------------------------
    def noise(self, count: int, height: int, width: int, seed: int) -> torch.Tensor:
        """Initial noise (count, channels, height/8, width/8), image i drawn from seed + i on the CPU."""
        shape = (1, self.transformer.config.channels, height // 8, width // 8)
        return torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))
                          for i in range(count)])

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 guidance: float | None = None,
                 mu: float | None = None, seed: int = 0, num_images: int = 1, latents: torch.Tensor | None = None,
                 max_sequence_length: int = 512, progress: bool = True, cache=None, image=None,
                 strength: float | None = None, mask_image=None, mask_blur: float = 0, outpaint=None) -> Krea2Output:
        """Prompts → images: validate, plan, then encode → denoise → decode (see `_generate`).

        `cache`: None (every block every step), or a step cache spec such as "fbcache:0.1" or "taylor:1"
        (a string or `krea2_lite.cache.CacheSpec`; docs/step-caching.md).
        Images in (docs/images-in.md): `image` (PIL, path, or float tensor (B, 3, H, W) in [0, 1]) starts
        from that image at `strength` (0, 1] (default 0.6; 1.0 = text to image's pixels); `mask_image`
        (white = repaint) inpaints, `outpaint=(left, top, right, bottom)` pads and fills the new area
        (both default to strength 1.0); `mask_blur` softens the mask edge (Gaussian sigma, pixels)."""
        inputs = dict(image=image, strength=strength, mask_image=mask_image, mask_blur=mask_blur, outpaint=outpaint)
        call = self._validate(prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                              guidance=guidance, mu=mu, seed=seed, num_images=num_images, latents=latents,
                              max_sequence_length=max_sequence_length, inputs=inputs)
        call.cache = self._cache_spec(cache, call)
        call.progress = progress
        self._fit_plan(call.width, call.height, call.cfg, call.total, call.max_sequence_length,
                       extra=self._cache_bytes(call), image_in=call.image_in is not None)
        try:
            return self._generate(call)
        except torch.cuda.OutOfMemoryError as exc:
            # Keep only the message: the exception's traceback holds the failed step's activations.
            first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        plan = self._replan_after_oom(call, first)  # one re-plan for a smaller budget, visible as a warning
        try:
            return self._generate(call)
        except torch.cuda.OutOfMemoryError as exc:
            raise DeviceMemoryError(
                f"out of GPU memory generating {call.describe()}, also after re-planning for "
                f"{plan.budget_bytes / (1 << 30):.2f} GiB (offload '{plan.mode}', {len(plan.streamed_blocks)} blocks "
                f"streamed): {str(exc).splitlines()[0]} — lower the resolution or num_images, pass a smaller "
                "vram_gb, or load a quantized model (quant='int8' / 'int4')") from exc

    def _validate(self, prompt, *, negative_prompt, width, height, steps, guidance, mu, seed, num_images, latents,
                  max_sequence_length, inputs=None) -> "_Call":
        """Every argument checked (bounds and messages in checks.py) and defaults filled in."""
        prompts = checks.check_prompts("prompt", prompt)
        image_in = None
        if inputs is not None:  # images in: sizes from the image, every input read and checked (images_in.py)
            total = len(prompts) * checks.check_num_images(num_images)
            image_in, width, height = images_in.prepare(**inputs, width=width, height=height, total=total,
                                                        max_side=checks.MAX_SIDE)
        width = checks.rounded_side("width", self.default_size[0] if width is None else width)
        height = checks.rounded_side("height", self.default_size[1] if height is None else height)
        steps = checks.check_steps(self.defaults.steps if steps is None else steps)
        guidance = checks.check_guidance(self.defaults.guidance if guidance is None else guidance)
        num_images = checks.check_num_images(num_images)
        max_sequence_length = checks.check_max_sequence_length(max_sequence_length, self.text_encoder)
        mu = checks.check_mu(mu)
        negatives = None
        if guidance > 0:
            negatives = checks.check_prompts("negative_prompt", "" if negative_prompt is None else negative_prompt)
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            checks.check_prompts("negative_prompt", negatives, expected=len(prompts))
        total = checks.check_call_total(len(prompts), num_images, width, height)
        seed = checks.check_seed(seed, total)
        if latents is None:
            noise = self.noise(total, height, width, seed)
        else:
            noise = checks.check_latents(latents, (total, self.transformer.config.channels, height // 8,
                                                   width // 8))
        from .metadata import image_metadata

        # mu None here means "from the size" unless the variant pins it; seed None: the caller's own noise.
        described = image_metadata(self, prompts=prompts, negatives=negatives, num_images=num_images,
                                   seed=seed if latents is None else None, steps=steps, guidance=float(guidance),
                                   mu=mu if mu is not None else self.defaults.mu, width=width, height=height,
                                   max_sequence_length=max_sequence_length)
        if image_in is not None:
            inpaint.cut_schedule(torch.zeros(steps + 1), image_in.strength)  # no step left: an error now
            self.image_encoder()  # a VAE without encoder weights: the error now, before any work
            for meta in described:
                meta.update(image_in.metadata())
        return _Call(prompts, negatives, num_images, noise, steps, float(guidance), mu, max_sequence_length,
                     width, height, described, image_in=image_in)

    def _cache_spec(self, cache, call: "_Call"):
        """The call's CacheSpec (or None), recorded in its images' metadata; Turbo gets a warning."""
        from .cache import parse_cache

        spec = parse_cache(cache)
        if spec is not None:
            if self.variant == "turbo":
                warnings.warn(f"cache={spec.name!r} on a Turbo model: an 8-step distilled model changes a lot at "
                              "every step, so a step cache skips little and costs quality", stacklevel=3)
            if spec.warmup + spec.tail >= call.steps or spec.threshold == 0:  # an option without effect is said
                why = (f"warmup={spec.warmup} + tail={spec.tail} cover all {call.steps} steps" if spec.threshold
                       else "threshold 0 never skips")
                warnings.warn(f"cache={spec.name!r} skips no step: {why}", stacklevel=3)
            for meta in call.metadata:
                meta["cache"] = spec.name
        return spec

    def _cache_bytes(self, call: "_Call") -> int:
        """Device bytes the call's step cache may hold (0 without one), for the memory plan."""
        if call.cache is None:
            return 0
        from .cache.state import device_bytes

        cfg = self.transformer.config
        tokens = call.max_sequence_length + (call.width // 16) * (call.height // 16)
        rows = call.total * (2 if call.cfg else 1)
        itemsize = torch.finfo(self.dtype).bits // 8
        return device_bytes(call.cache, rows, tokens, cfg.features, itemsize)

    def _replan_after_oom(self, call: "_Call", first: str):
        """After a CUDA out-of-memory error: a plan for REPLAN_FACTOR × the last plan's peak, applied
        (with a RuntimeWarning printing it), or DeviceMemoryError when no smaller plan exists."""
        cfg, images, length = call.cfg, call.total, call.max_sequence_length
        last = self.memory_plan or self.plan(None, mode="none", width=call.width, height=call.height, cfg=cfg,
                                             num_images=images, max_sequence_length=length,
                                             image_in=call.image_in is not None)
        budget = REPLAN_FACTOR * last.peak_bytes / (1 << 30)
        try:
            plan = self.plan(budget, width=call.width, height=call.height, cfg=cfg, num_images=images,
                             prefetch=last.prefetch, max_sequence_length=length,
                             extra_device_bytes=self._cache_bytes(call), image_in=call.image_in is not None)
        except MemoryPlanError as exc:
            raise DeviceMemoryError(f"out of GPU memory generating {call.describe()}: {first}; no smaller memory "
                                    f"plan exists ({str(exc).splitlines()[0]}) — lower the resolution or "
                                    "num_images, or load a quantized model (quant='int4')") from None
        self.apply_plan(plan, self.device)
        warnings.warn(f"out of GPU memory generating {call.describe()}; retrying once with a smaller memory "
                      f"plan:\n{plan}", RuntimeWarning, stacklevel=3)
        return plan

    @backend_scope()  # KREA2_LITE_KERNELS is read once per generation
    def _generate(self, call: "_Call") -> Krea2Output:
        """encode → denoise → decode for validated settings."""
        start = self._encode_image(call) if call.image_in is not None else None
        cond, uncond = self._encode(call)
        final = self._denoise(call, cond, uncond, start)
        images = to_pil(self._decode(final))
        if call.image_in is not None and call.image_in.mask is not None:  # kept pixels: the input's, exactly
            images = inpaint.composite(images, call.image_in.pixels, call.image_in.mask)
        return Krea2Output(images=images, latents=final, metadata=call.metadata,
                           block_evaluations=call.block_evaluations[0],
                           block_evaluations_total=call.block_evaluations[1])

    def image_encoder(self):
        """The VAE encoder (images in), read from the VAE's files on first use and kept on the host."""
        if self.vae_encoder is None:
            if self.vae_encoder_loader is None:
                raise ValueError("this pipeline does not know its VAE's files; set pipe.vae_encoder "
                                 "(krea2_lite.load_vae_encoder) to pass images in")
            self.vae_encoder = self.vae_encoder_loader(device="cpu")
        return self.vae_encoder

    def _encode_image(self, call: "_Call") -> torch.Tensor:
        """The input image's normalised latents (1 or B, channels, H/8, W/8), float32 on the device."""
        encoder = self.image_encoder()
        if self._encoder_placement is None or self._encoder_placement.device != self.device:
            self._encoder_placement = ImageEncoderPlacement(encoder, self.device)
        tile = self.vae_tile
        if self.memory_plan is not None and self.memory_plan.vae_tile is not None:
            tile = self.memory_plan.vae_tile
        with self._encoder_placement.encoding():
            pixels = call.image_in.pixels.to(encoder.device, encoder.dtype) * 2 - 1
            z = encoder.encode(pixels, tile=tile)
        return encoder.normalize_latents(z.float())

    def _encode(self, call: "_Call"):
        """(cond, uncond or None): compacted text conditioning, repeated per image."""
        with self.offloader.encoding() if self.offloader is not None else contextlib.nullcontext():
            hidden, mask = self.text_encoder.encode(call.prompts + (call.negatives or []), call.max_sequence_length)
        release_workspaces(self.text_encoder)  # its dequantization scratch is not needed until the next call
        hidden = hidden.to(self.device, self.dtype).repeat_interleave(call.num_images, dim=0)
        mask = mask.to(self.device).repeat_interleave(call.num_images, dim=0)
        total = call.total
        cond = compact_text(hidden[:total], mask[:total])
        return cond, (compact_text(hidden[total:], mask[total:]) if call.negatives else None)

    def _denoise(self, call: "_Call", cond, uncond, start: torch.Tensor | None = None) -> torch.Tensor:
        """The flow ODE from the call's noise: final latents, unpacked (N, channels, H/8, W/8)."""
        lat_h, lat_w = call.latents.shape[-2:]
        rows, cols = lat_h // 2, lat_w // 2
        mu = call.mu
        if mu is None:
            mu = self.defaults.mu if self.defaults.mu is not None else resolution_mu(rows * cols, **self.shift)
        try:
            with np.errstate(all="ignore"):  # a degenerate schedule is reported by check_schedule instead
                schedule = sigmas(call.steps, mu)
        except (OverflowError, ZeroDivisionError):
            schedule = torch.full((call.steps + 1,), float("nan"))
        check_schedule(schedule, mu, self.shift)
        packed = pack_latents(call.latents.to(self.device, self.dtype), self.transformer.config.patch)
        blend = None
        if start is not None:  # images in: the schedule's tail from the noised image (inpaint.py)
            schedule, packed, blend = inpaint.image_start(call.image_in, start, call.latents.to(self.device),
                                                          schedule, self.transformer.config.patch, self.dtype)

        from tqdm.auto import tqdm

        blocks = len(self.transformer.blocks)
        run_steps = len(schedule) - 1  # fewer than call.steps when an input image's strength cuts the schedule
        call.block_evaluations = (run_steps * blocks, run_steps * blocks)
        with tqdm(total=run_steps, desc="sampling", unit="step", disable=not call.progress) as bar:
            if call.cache is None:
                out = denoise(self.transformer, packed, cond, schedule, guidance=call.guidance, uncond=uncond,
                              rows=rows, cols=cols, progress=lambda _: bar.update(), after_step=blend)
            else:
                out = self._denoise_cached(call, packed, cond, uncond, schedule, rows, cols, bar, blend)
        release_workspaces(self.transformer)  # the decode phase holds no kernel scratch (as planned)
        return unpack_latents(out, lat_h, lat_w, self.transformer.config.patch)

    def _denoise_cached(self, call: "_Call", packed, cond, uncond, schedule, rows: int, cols: int, bar,
                        blend=None):
        """`denoise` with the call's step cache attached for its duration (streamed blocks gated)."""
        from .cache import attach_cache

        gate = getattr(self.offloader, "streamer", None)
        with attach_cache(self.transformer, call.cache, gate=gate, steps=len(schedule) - 1) as cache:
            def step(_):
                bar.set_postfix_str(f"blocks {cache.state.evaluated}/{cache.state.total}", refresh=False)
                bar.update()

            out = denoise(self.transformer, packed, cond, schedule, guidance=call.guidance, uncond=uncond,
                          rows=rows, cols=cols, progress=step, after_step=blend)
        call.block_evaluations = (cache.state.evaluated, cache.state.total)
        return out

    def _decode(self, final: torch.Tensor) -> torch.Tensor:
        """Latents → [-1, 1] pixels, tiled as the plan says; NaN/inf stops with the cause named."""
        tile = self.vae_tile
        if self.memory_plan is not None and self.memory_plan.vae_tile is not None:
            tile = self.memory_plan.vae_tile
        pixels = self.vae.decode(final, tile=tile)
        check_decoded(pixels, final, self.vae)  # never a silent black image
        return pixels


@dataclass
class _Call:
    """One validated call's settings (what `_generate` runs)."""

    prompts: list[str]
    negatives: list[str] | None
    num_images: int
    latents: torch.Tensor  # the initial noise, unpacked
    steps: int
    guidance: float
    mu: float | None
    max_sequence_length: int
    width: int
    height: int
    metadata: list
    image_in: images_in.ImageIn | None = None  # images in: the prepared image / mask (images_in.py)
    progress: bool = True
    cache: object = None  # krea2_lite.cache.CacheSpec or None
    block_evaluations: tuple = (None, None)  # (ran, uncached total), set by _denoise

    @property
    def total(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def cfg(self) -> bool:
        return self.negatives is not None

    def describe(self) -> str:
        return f"{self.total} image(s) at {self.width}×{self.height}{' with CFG' if self.cfg else ''}"


def to_pil(images: torch.Tensor) -> list:
    """[-1, 1] images (N, 3, H, W) → PIL, rounding to the nearest 8-bit value (as diffusers does;
    the official script truncates, which darkens by half a level on average)."""
    from PIL import Image

    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
