"""`train_lora(...)`: settings checked → data scanned → memory plan → preprocess (encoders freed) →
quantized transformer loaded and frozen → LoRA attached → training loop → LoRA file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import ArgumentError, ArgumentTypeError
from ..loading.pipeline import resolve_pipeline
from ..loading.transformer import load_transformer
from .checkpoint import load_checkpoint
from .data import scan_folder
from .lora_params import TrainableLora, target_modules
from .loop import Run, train_loop
from .base_model import freeze
from .cache import preprocess
from .memory import TrainingPlan, check_fits
from .order import DataOrder
from .settings import TrainSettings, check_settings
from .run_paths import remove_leftovers
from .samples import NEGATIVE, Sampler
from .streaming import StreamedTraining


def _identity(settings: TrainSettings, examples) -> dict:
    data = hashlib.sha256(json.dumps([[str(e.latent_file.name), str(e.text_file.name)] for e in examples]).encode())
    return {"rank": settings.rank, "lora_alpha": settings.lora_alpha, "targets": list(settings.targets),
            "seed": settings.seed, "batch": settings.batch, "grad_accum": settings.grad_accum, "lr": settings.lr,
            "data_keys": data.hexdigest()}


def _plan(spec, settings: TrainSettings, dtype) -> TrainingPlan:
    shapes = []
    cfg = spec.config
    kv = cfg.kvheads * cfg.headdim
    leaf_shapes = {"attn.wq": (cfg.features, cfg.features), "attn.wk": (cfg.features, kv),
                   "attn.wv": (cfg.features, kv), "attn.wo": (cfg.features, cfg.features),
                   "attn.gate": (cfg.features, cfg.features), "mlp.gate": (cfg.features, cfg.mlpdim),
                   "mlp.up": (cfg.features, cfg.mlpdim), "mlp.down": (cfg.mlpdim, cfg.features)}
    from .settings import TARGET_GROUPS

    for leaf in sorted({leaf for group in settings.targets for leaf in TARGET_GROUPS[group]}):
        shapes.append(leaf_shapes[leaf])
        if settings.rank > min(leaf_shapes[leaf]):  # refused before any encoding (the layer check repeats it)
            raise ArgumentError(f"rank {settings.rank} exceeds layer blocks.*.{leaf} "
                                f"({leaf_shapes[leaf][1]}×{leaf_shapes[leaf][0]}); use rank ≤ {min(leaf_shapes[leaf])}")
    return check_fits(cfg, spec.quant, vram_gb=settings.vram_gb, ram_gb=settings.ram_gb, rank=settings.rank,
                      resolution=settings.resolution, batch=settings.batch,
                      text_tokens=min(settings.max_sequence_length, 256), dtype=dtype, target_shapes=tuple(shapes))


def train_lora(model: str | None = None, *, data: str, output: str, log=print, **options) -> Path:
    """Train a LoRA on `data` and write it to `output` (diffusers/PEFT layout). Returns the path."""
    unknown = sorted(set(options) - set(TrainSettings.__dataclass_fields__) - {"sample_texts"})
    if unknown or "sample_texts" in options:
        raise ArgumentTypeError(f"train_lora() got unknown option(s) {', '.join(unknown or ['sample_texts'])}; "
                                f"see help(krea2_lite.train.TrainSettings)")
    settings = check_settings(TrainSettings(model=model, data=str(data), output=str(output), **options))
    remove_leftovers(settings)  # temporary files of killed runs beside this run's outputs
    device = torch.device(settings.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = resolve_pipeline(settings.model, quant=settings.quant, transformer=settings.transformer,
                            text_encoder=settings.text_encoder, vae=settings.vae)
    Path(settings.output).parent.mkdir(parents=True, exist_ok=True)
    items, skips = scan_folder(settings.data, settings.resolution, settings.trigger)
    if skips:
        log(f"skipped {len(skips)} file(s):\n  " + "\n  ".join(skips))
    plan = _plan(spec, settings, dtype)
    if plan.streamed_blocks:
        log(f"memory plan: {plan.describe()}")
    extra = settings.sample_texts + (NEGATIVE,) if settings.sample_texts else ()
    examples = preprocess(items, spec, settings, log=log, extra_texts=extra)
    streamed = plan.streamed_blocks
    transformer = freeze(load_transformer(spec.transformer, config=spec.config, device=device, dtype=dtype,
                                          quant=settings.quant, progress=False,  # a stored format loads as stored
                                          device_blocks=plan.resident_blocks if streamed else None))
    streaming = StreamedTraining(transformer, streamed, device) if streamed else None
    lora = TrainableLora(transformer, target_modules(transformer, settings.targets), settings.rank,
                         settings.lora_alpha, settings.seed)
    lora.attach(device)
    params = list(lora.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    run = Run(transformer, lora, optimizer, generator, DataOrder([e.bucket for e in examples], settings.batch,
                                                                   settings.seed),
              examples, settings, dict(spec.shift), device, _identity(settings, examples), streaming=streaming,
              sampler=Sampler(transformer, spec, settings, device) if settings.sample_texts else None)
    if settings.resume:
        progress = load_checkpoint(Path(settings.resume), lora=lora, optimizer=optimizer, params=params,
                                   generator=generator, identity=run.identity)
        run.step, run.order.epoch, run.order.position = progress["step"], progress["epoch"], progress["position"]
        log(f"resumed from {settings.resume} at step {run.step}")
    try:
        train_loop(run, log=log)
    finally:
        lora.detach_hooks()
        if streaming is not None:
            streaming.close()
    return Path(settings.output)
