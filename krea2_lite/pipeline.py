"""Krea2Pipeline: holds the three components and turns prompts into PIL images.

The pipeline is thin: argument checks, prompt encoding, noise, then `sampling.denoise` and the
VAE. Noise is drawn on the CPU with a torch.Generator seeded `seed + i` for image i, so a seed
gives the same image on any device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import infer_config, load_transformer, open_checkpoint, resolve_path
from .errors import CheckpointNotFoundError, DeviceMemoryError, MemoryPlanError
from .model.text_encoder import DEFAULT_SELECT_LAYERS, load_text_encoder
from .model.vae import load_vae_decoder
from .lora import lora_bytes
from .offload import plan_memory
from .offload.manager import Offloader
from .sampling import DEFAULT_SHIFT, compact_text, denoise, pack_latents, resolution_mu, sigmas, unpack_latents

logger = logging.getLogger("krea2_lite")

# Where the released model's other components live when only a transformer file is given.
DEFAULT_TEXT_ENCODER = "Qwen/Qwen3-VL-4B-Instruct"
DEFAULT_VAE = "Qwen/Qwen-Image"
MAX_SIDE = 4096  # pixels; Turbo is trained up to 2k, beyond 4k attention cost explodes
SIZE_MULTIPLE = 16  # VAE factor 8 × patch 2
OFFLOAD_MODES = ("auto", "none", "model", "sequential")
REPLAN_FACTOR = 0.8  # after a CUDA out-of-memory error, plan again for this share of the last peak


@dataclass(frozen=True)
class VariantDefaults:
    steps: int
    guidance: float
    mu: float | None  # None: from the image-token count


VARIANTS = {
    "raw": VariantDefaults(steps=52, guidance=3.5, mu=None),
    "turbo": VariantDefaults(steps=8, guidance=0.0, mu=1.15),
}


@dataclass
class Krea2Output:
    images: list  # PIL.Image.Image, prompt-major: prompt 0 images 0..n-1, then prompt 1, ...
    latents: torch.Tensor  # final latents, unpacked (N, channels, H/8, W/8)
    # One dict per image: the settings that reproduce it (krea2_lite.metadata; save with save_png).
    metadata: list = field(default_factory=list)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of a loaded module."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def describe_transformer(path, quant):
    """(Krea2Config, QuantSpec or None) of a transformer checkpoint, from its headers / manifest only."""
    from .config import Krea2Config
    from .quantize import QuantSpec
    from .quantize.format import is_quantized_folder, read_manifest

    location = resolve_path(path, ["*.json", "*.safetensors", "transformer/*"])
    if is_quantized_folder(location):
        manifest = read_manifest(location)
        return Krea2Config.from_dict(manifest["config"]), QuantSpec.from_dict(manifest["quant"])
    source = open_checkpoint(location)
    theta = float((source.diffusers_config or {}).get("rope_theta", 1000.0))
    return infer_config(source.shapes(), theta=theta, where=str(source.location)), QuantSpec.parse(quant)


def text_encoder_shape(encoder) -> dict:
    """The sizes the planner needs for the encoder's activations, from its own config."""
    c = encoder.config
    return dict(hidden=c.hidden_size, intermediate=c.intermediate_size, heads=c.num_attention_heads,
                kvheads=c.num_key_value_heads, headdim=getattr(c, "head_dim", None) or c.hidden_size //
                c.num_attention_heads, vocab=c.vocab_size, layers=c.num_hidden_layers)


def _budget_gib(vram_gb: float | None, device: torch.device) -> float | None:
    """The plan's budget: vram_gb, else what CUDA reports free on `device`, else none (CPU)."""
    if vram_gb is not None or device.type != "cuda":
        return vram_gb
    free, _ = torch.cuda.mem_get_info(device)
    return free / (1 << 30)


class Krea2Pipeline:
    def __init__(self, transformer, text_encoder, vae, *, variant: str = "raw",
                 shift: dict | None = None, vae_tile: int | str | None = "auto",
                 defaults: VariantDefaults | None = None, default_size: tuple[int, int] = (1024, 1024)):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
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
        self.plan_request = None  # {"vram_gb", "mode"} when from_pretrained planned to a budget
        self._device = None
        self.source = None  # what from_pretrained was given (a path, hub id or "demo"), for image metadata

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
                        prefetch: int = 1) -> "Krea2Pipeline":
        """Load a pipeline from a diffusers folder (model_index.json), a hub id, or explicit paths.

        `path_or_hub_id` may also be a single transformer file (official or ComfyUI); the text
        encoder and VAE then come from `text_encoder=` / `vae=` or the released defaults
        (Qwen/Qwen3-VL-4B-Instruct, Qwen/Qwen-Image's vae/). `variant` "raw" / "turbo" picks the
        sampling defaults; None reads diffusers' `is_distilled` from the folder and otherwise
        assumes "raw" (log line says so). `device=None` picks CUDA when present.

        Memory: `offload` "none" puts everything on `device`; "model" / "sequential" / "auto" plan
        with `krea2_lite.offload.plan_memory` for `vram_gb` GiB (default: the free CUDA memory;
        on the CPU "auto" means "none"), streaming blocks with `prefetch` copies in flight. The
        plan is `pipe.memory_plan`; each call re-plans for its own size when that changes it.
        """
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        if vram_gb is not None and (isinstance(vram_gb, bool) or not isinstance(vram_gb, (int, float))
                                    or not vram_gb > 0):
            raise ValueError(f"vram_gb must be a positive number of GiB, got {vram_gb!r}")
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)} or None, got {variant!r}")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        source = os.fspath(path_or_hub_id if path_or_hub_id is not None else transformer or "") or None
        if os.fspath(path_or_hub_id or "") == "demo" and not Path("demo").exists():
            from .demo import demo_path  # the trained miniature shipped with the package

            path_or_hub_id = demo_path()

        root = None
        if path_or_hub_id is not None:
            root = resolve_path(path_or_hub_id, ["*.json", "*.safetensors", "*/*.json", "*/*.safetensors",
                                                 "tokenizer/*", "*.txt"])
        index = _read_json(root / "model_index.json") if root is not None and root.is_dir() else {}
        manifest = _read_json(root / "krea2_lite.json") if root is not None and root.is_dir() else {}
        if manifest:  # a folder written by `python -m krea2_lite.quantize`
            index = dict(manifest.get("components", {}).get("pipeline", {}))
            if manifest.get("variant") and "is_distilled" not in index:
                index["is_distilled"] = manifest["variant"] == "turbo"
            transformer = transformer or root
        if root is not None and not index and not manifest:
            if transformer is not None:
                raise ValueError(f"{root}: not a diffusers pipeline folder (no model_index.json), and "
                                 "transformer= was given as well; pass one or the other")
            transformer, root = root, None
        if root is not None:
            transformer = transformer or root / "transformer"
            if text_encoder is None and not (root / "text_encoder").exists():
                raise CheckpointNotFoundError(f"{root}: no text_encoder/ folder; pass text_encoder=")
            text_encoder = text_encoder or root / "text_encoder"
            vae = vae or root / "vae"
        if transformer is None:
            raise ValueError("nothing to load: pass a pipeline folder / hub id, or transformer=")

        variant_given = variant is not None
        if variant is None:
            if "is_distilled" in index:
                variant = "turbo" if index["is_distilled"] else "raw"
            else:
                variant = "raw"
                logger.warning("krea2_lite: the checkpoint does not say whether it is Raw or Turbo; using Raw's "
                               "defaults (52 steps, CFG 3.5). Pass variant='turbo' for Turbo.")
        shift = {}
        if root is not None:
            scheduler = _read_json(root / "scheduler" / "scheduler_config.json")
            shift = {k: scheduler[k] for k in DEFAULT_SHIFT if k in scheduler}
        select_layers = tuple(index.get("text_encoder_select_layers") or DEFAULT_SELECT_LAYERS)
        # A folder may carry its own sampling defaults and native size (the demo model does).
        own = index.get("krea2_lite") or {}
        defaults = None
        if not variant_given and "steps" in own and "guidance" in own:
            defaults = VariantDefaults(steps=int(own["steps"]), guidance=float(own["guidance"]), mu=own.get("mu"))
        default_size = (int(own.get("width", 1024)), int(own.get("height", 1024)))

        # With offloading, the text encoder and the VAE are loaded to the host first: the plan needs
        # their exact sizes, and decides where they live.
        planned = offload != "none" and not (offload == "auto" and device.type != "cuda" and vram_gb is None)
        load_device = torch.device("cpu") if planned else device
        text_path = resolve_path(text_encoder or DEFAULT_TEXT_ENCODER,
                                 ["*.json", "*.safetensors", "*.txt", "tokenizer*", "merges.txt", "vocab.json"])
        encoder = load_text_encoder(text_path, device=load_device, dtype=dtype, select_layers=select_layers)
        if vae is None:
            vae_path = resolve_path(DEFAULT_VAE, ["vae/*"]) / "vae"
        else:
            vae_path = resolve_path(vae, ["*.json", "*.safetensors", "vae/*"])
        if not vae_path.exists():
            raise CheckpointNotFoundError(f"{vae_path}: VAE folder not found")
        # On the CPU the VAE runs in float32: bf16 convolutions there are many times slower
        # (no native bf16 on most desktop CPUs), and the decoder is small.
        decoder = load_vae_decoder(vae_path, device=load_device,
                                   dtype=dtype if device.type == "cuda" else torch.float32)
        plan = None
        if planned:
            config, spec = describe_transformer(transformer, quant)
            budget = _budget_gib(vram_gb, device)
            sizes = dict(dtype=dtype, cfg=VARIANTS[variant].guidance > 0, text_encoder_bytes=tensor_bytes(encoder),
                         vae_weight_bytes=tensor_bytes(decoder), vae_base_dim=decoder.config.base_dim,
                         text_encoder_shape=text_encoder_shape(encoder), prefetch=prefetch)
            try:  # planned for the model's default size; every call re-plans for its own (see _fit_plan)
                plan = plan_memory(config, spec, budget, *default_size, mode=offload, **sizes)
            except MemoryPlanError as exc:
                if exc.limit != "device" or budget is None:
                    raise
                plan = plan_memory(config, spec, None, mode="sequential", **sizes)
                logger.warning("krea2_lite: %s GiB cannot hold a %d×%d generation; every block will be streamed "
                               "until a call's size says otherwise", f"{budget:.2f}", *default_size)
            logger.info("krea2_lite: %s", plan)
            if plan.mode == "none":
                load_device = device
        model = load_transformer(transformer, device=load_device, dtype=dtype, quant=quant, progress=progress)
        if model.config.channels != decoder.config.z_dim:
            raise ValueError(f"the transformer works on {model.config.channels} latent channels but the VAE at "
                             f"{vae_path} has z_dim={decoder.config.z_dim}")
        pipe = cls(model, encoder, decoder, variant=variant, shift=shift, defaults=defaults,
                   default_size=default_size)
        if plan is not None:
            pipe.apply_plan(plan, device)
            pipe.plan_request = dict(vram_gb=budget, mode=offload)
        pipe.source = source
        return pipe

    # ---- memory placement ------------------------------------------------------------------
    def plan(self, vram_gb: float | None, *, mode: str = "auto", width: int = 1024, height: int = 1024,
             cfg: bool | None = None, num_images: int = 1, prefetch: int = 1, max_sequence_length: int = 512):
        """A MemoryPlan for this pipeline's components (their exact sizes) and one call's shape."""
        quantization = getattr(self.transformer, "quantization", None)
        return plan_memory(self.transformer.config, quantization.spec if quantization else None, vram_gb,
                           width, height, mode=mode, dtype=self.dtype,
                           cfg=self.defaults.guidance > 0 if cfg is None else cfg, num_images=num_images,
                           text_encoder_bytes=tensor_bytes(self.text_encoder),
                           vae_weight_bytes=tensor_bytes(self.vae), vae_base_dim=self.vae.config.base_dim,
                           prefetch=prefetch, max_sequence_length=max_sequence_length,
                           text_encoder_shape=text_encoder_shape(self.text_encoder),
                           extra_device_bytes=lora_bytes(self.transformer))

    def apply_plan(self, plan, device: str | torch.device | None = None) -> None:
        """Place the components as `plan` says (undoing any previous plan first)."""
        device = torch.device(device) if device is not None else self.device
        if self.offloader is not None:
            self.offloader.release()
            self.offloader = None
        self.offloader = Offloader(self.transformer, self.text_encoder, self.vae, plan, device)
        self.memory_plan, self._device = plan, device

    def _fit_plan(self, width: int, height: int, cfg: bool, images: int, max_sequence_length: int) -> None:
        """Re-plan for this call's shape when the pipeline was planned to a budget and the placement changes
        (a larger image or batch may need more blocks streamed; a smaller one may need fewer)."""
        request = self.plan_request
        if self.memory_plan is None or request is None or request["vram_gb"] is None:
            return
        plan = self.plan(request["vram_gb"], mode=request["mode"], width=width, height=height, cfg=cfg,
                         num_images=images, prefetch=self.memory_plan.prefetch,
                         max_sequence_length=max_sequence_length)
        if _placement(plan) != _placement(self.memory_plan):
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
        return load_lora(self.transformer, path, scale=scale, name=name, merge=merge, device=self.device)

    def set_lora_scale(self, scale: float, name: str | None = None) -> None:
        from .lora import set_lora_scale

        set_lora_scale(self.transformer, scale, name)

    def unload_lora(self, name: str | None = None) -> None:
        from .lora import unload_lora

        unload_lora(self.transformer, name)

    # ---- generation ------------------------------------------------------------------------
    def _check_size(self, name: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int number of pixels, got {value!r}")
        if value <= 0 or value > MAX_SIDE:
            raise ValueError(f"{name} must be in 1..{MAX_SIDE} pixels, got {value}")
        rounded = SIZE_MULTIPLE * math.ceil(value / SIZE_MULTIPLE)
        if rounded != value:
            warnings.warn(f"{name}={value} is not a multiple of {SIZE_MULTIPLE}; using {rounded}", stacklevel=3)
        return rounded

    @staticmethod
    def _prompt_list(name: str, value, expected: int | None = None) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
            raise TypeError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
        if expected is not None and len(items) != expected:
            raise ValueError(f"{name} has {len(items)} entries but there are {expected} prompts")
        return list(items)

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
                 max_sequence_length: int = 512, progress: bool = True) -> Krea2Output:
        prompts = self._prompt_list("prompt", prompt)
        width = self.default_size[0] if width is None else width  # 1024 unless the folder says
        height = self.default_size[1] if height is None else height
        width, height = self._check_size("width", width), self._check_size("height", height)
        steps = self.defaults.steps if steps is None else steps
        guidance = self.defaults.guidance if guidance is None else guidance
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not guidance >= 0:
            raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images <= 0:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length <= 0:
            raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
        negatives = None
        if guidance > 0:
            negatives = self._prompt_list("negative_prompt", "" if negative_prompt is None else negative_prompt)
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            self._prompt_list("negative_prompt", negatives, expected=len(prompts))

        total = len(prompts) * num_images
        user_latents = latents
        channels = self.transformer.config.channels
        lat_h, lat_w = height // 8, width // 8
        if latents is None:
            latents = self.noise(total, height, width, seed)
        elif tuple(latents.shape) != (total, channels, lat_h, lat_w):
            raise ValueError(f"latents must have shape {(total, channels, lat_h, lat_w)} "
                             f"(images, channels, height/8, width/8), got {tuple(latents.shape)}")
        elif not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or inf")
        call = dict(prompts=prompts, negatives=negatives, num_images=num_images, latents=latents, steps=steps,
                    guidance=float(guidance), mu=mu, max_sequence_length=max_sequence_length, progress=progress)
        from .metadata import image_metadata

        # mu None here means "from the size" unless the variant pins it; seed None: the caller's own noise.
        described = image_metadata(self, prompts=prompts, negatives=negatives, num_images=num_images,
                                   seed=seed if user_latents is None else None, steps=steps,
                                   guidance=float(guidance), mu=mu if mu is not None else self.defaults.mu,
                                   width=width, height=height)
        self._fit_plan(width, height, negatives is not None, total, max_sequence_length)
        try:
            return dataclasses.replace(self._generate(**call), metadata=described)
        except torch.cuda.OutOfMemoryError as exc:
            # Keep only the message: the exception's traceback holds the failed step's activations.
            first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        # One re-plan with a smaller budget, then a clear failure.
        where = f"{total} image(s) at {width}×{height}{' with CFG' if negatives else ''}"
        try:
            plan = self._replan(width, height, negatives is not None, total, max_sequence_length)
        except MemoryPlanError as exc:
            raise DeviceMemoryError(f"out of GPU memory generating {where}: {first}; no smaller memory plan "
                                    f"exists ({str(exc).splitlines()[0]}) — lower the resolution or num_images, "
                                    "or load a quantized model (quant='int4')") from None
        warnings.warn(f"out of GPU memory generating {where}; retrying once with a smaller memory plan:\n{plan}",
                      RuntimeWarning, stacklevel=2)
        try:
            return dataclasses.replace(self._generate(**call), metadata=described)
        except torch.cuda.OutOfMemoryError as exc:
            raise DeviceMemoryError(
                f"out of GPU memory generating {where}, also after re-planning for "
                f"{plan.budget_bytes / (1 << 30):.2f} GiB (offload '{plan.mode}', {len(plan.streamed_blocks)} blocks "
                f"streamed): {str(exc).splitlines()[0]} — lower the resolution or num_images, pass a smaller "
                "vram_gb, or load a quantized model (quant='int8' / 'int4')") from exc

    def _replan(self, width: int, height: int, cfg: bool, images: int, max_sequence_length: int):
        """After an out-of-memory error: a plan for REPLAN_FACTOR × the last plan's peak, applied."""
        last = self.memory_plan or self.plan(None, mode="none", width=width, height=height, cfg=cfg,
                                             num_images=images, max_sequence_length=max_sequence_length)
        budget = REPLAN_FACTOR * last.peak_bytes / (1 << 30)
        plan = self.plan(budget, width=width, height=height, cfg=cfg, num_images=images, prefetch=last.prefetch,
                         max_sequence_length=max_sequence_length)
        self.apply_plan(plan, self.device)
        return plan

    def _generate(self, *, prompts, negatives, num_images, latents, steps, guidance, mu, max_sequence_length,
                  progress) -> Krea2Output:
        total = latents.shape[0]
        lat_h, lat_w = latents.shape[-2:]
        with self.offloader.encoding() if self.offloader is not None else contextlib.nullcontext():
            hidden, mask = self.text_encoder.encode(prompts + (negatives or []), max_sequence_length)
        hidden = hidden.to(self.device, self.dtype).repeat_interleave(num_images, dim=0)
        mask = mask.to(self.device).repeat_interleave(num_images, dim=0)
        cond = compact_text(hidden[:total], mask[:total])
        uncond = compact_text(hidden[total:], mask[total:]) if negatives else None

        rows, cols = lat_h // 2, lat_w // 2
        if mu is None:
            mu = self.defaults.mu if self.defaults.mu is not None else resolution_mu(rows * cols, **self.shift)
        schedule = sigmas(steps, mu)
        packed = pack_latents(latents.to(self.device, self.dtype), self.transformer.config.patch)

        from tqdm.auto import tqdm

        with tqdm(total=steps, desc="sampling", unit="step", disable=not progress) as bar:
            out = denoise(self.transformer, packed, cond, schedule, guidance=guidance, uncond=uncond,
                          rows=rows, cols=cols, progress=lambda _: bar.update())
        final = unpack_latents(out, lat_h, lat_w, self.transformer.config.patch)
        tile = self.vae_tile
        if self.memory_plan is not None and self.memory_plan.vae_tile is not None:
            tile = self.memory_plan.vae_tile
        pixels = self.vae.decode(final, tile=tile)
        return Krea2Output(images=to_pil(pixels), latents=final)


def _placement(plan) -> tuple:
    return (plan.mode, plan.resident_blocks, plan.streamed_blocks, plan.text_encoder,
            plan.transformer_leaves_for_encoding, plan.vae_tile, plan.prefetch)


def to_pil(images: torch.Tensor) -> list:
    """[-1, 1] images (N, 3, H, W) → PIL, rounding to the nearest 8-bit value (as diffusers does;
    the official script truncates, which darkens by half a level on average)."""
    from PIL import Image

    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
