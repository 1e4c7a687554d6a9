"""Sample images during training (`--sample-every N --sample-prompts FILE`): every N steps and at the end,
one image per prompt with the LoRA as it is at that step, through the library's own pipeline.

Memory: the text encoder is gone before the first step, so the sample prompts (and the empty negative
prompt of CFG) are encoded once up front with the captions, padded as the pipeline pads them, and cached
the same way (`cache.text_file`);
`CachedTextStates` hands those states to the pipeline in place of an encoder. The VAE decoder (73M
parameters) is loaded once and kept on the host; it goes to the device only while it decodes, then
back. The transformer runs with the training hooks in place (the LoRA branches, streamed blocks, the
dequantized-weight forwards), under no_grad. Noise comes from the fixed `seed` (image i: seed + i),
so successive samples differ only by the LoRA.

Files: `OUTPUT_STEM-samples/stepNNNNNN-II.png`, written atomically by `metadata.save_png` with the
usual metadata plus the LoRA (`loras`: name, path, scale, step) and `training` (step, steps).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..loading.vae import load_vae_decoder
from ..metadata import save_png
from ..offload.swap import move_module
from ..pipeline import Krea2Pipeline
from ..files.small_tensor_file import read_small_file
from .cache import text_file
from .objective import pad_text

NEGATIVE = ""  # the pipeline's default negative prompt under CFG


class CachedTextStates(nn.Module):
    """Stands in for the text encoder: `encode(prompts, length)` → the cached (hidden, mask) of those prompts."""

    def __init__(self, states: dict[str, torch.Tensor]):
        super().__init__()
        self.states = states

    def encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = pad_text([self.states[p] for p in prompts])  # the training step's own padding
        return hidden, (torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask)


def sample_dir(output) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}-samples")


class Sampler:
    """The pipeline that draws the samples, built once before training."""

    def __init__(self, transformer, spec, settings, device: torch.device):
        self.settings, self.device = settings, torch.device(device)
        states = {p: read_small_file(text_file(p, spec, settings, padded=True))["hidden"].float()
                  for p in dict.fromkeys(settings.sample_texts + (NEGATIVE,))}
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = load_vae_decoder(spec.vae, device="cpu", dtype=dtype)
        self.pipe = Krea2Pipeline(transformer, CachedTextStates(states), self.vae, variant=spec.variant,
                                  shift=spec.shift, defaults=spec.defaults, default_size=spec.default_size)
        self.pipe._device = self.device  # streamed blocks may sit on the host between uses
        self.pipe.source = settings.model
        self.folder = sample_dir(settings.output)

    def due(self, step: int) -> bool:
        every = self.settings.sample_every
        return step % every == 0 or step == self.settings.steps

    def draw(self, step: int) -> list[Path]:
        """One image per sample prompt with the LoRA at `step`; returns the files written."""
        settings = self.settings
        lora = {"name": Path(settings.output).stem, "scale": 1.0, "path": str(Path(settings.output).resolve()),
                "step": step}
        move_module(self.vae, self.device)
        try:
            with torch.no_grad():
                out = self.pipe(list(settings.sample_texts), width=settings.resolution, height=settings.resolution,
                                seed=settings.seed, max_sequence_length=settings.max_sequence_length, progress=False)
        finally:
            move_module(self.vae, torch.device("cpu"))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        written = []
        for index, (image, meta) in enumerate(zip(out.images, out.metadata)):
            meta = dict(meta, loras=[lora], training={"step": step, "steps": settings.steps})
            written.append(save_png(image, self.folder / f"step{step:06d}-{index:02d}.png", meta))
        return written
