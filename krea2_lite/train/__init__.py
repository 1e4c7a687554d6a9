"""LoRA training on the frozen (quantized) Krea 2 transformer: `python -m krea2_lite.train`,
`krea2_lite.train_lora(...)`. See docs/training.md.

  settings.py     TrainSettings and every argument check
  data.py         image folders / metadata.jsonl → items; aspect buckets; skips listed
  cache.py        VAE latents + text states computed once, cached as safetensors, encoders freed
  objective.py    the official flow-matching loss (t = 1 noise, v = noise − x, shifted times)
  base_model.py   quantized linears backward through their dequantized weight; per-block checkpointing
  lora_params.py  trainable branches (hooks) and the diffusers/PEFT LoRA file
  order.py        the seeded data order (per epoch, per bucket)
  loop.py         AdamW, clipping, accumulation, saves, NaN stop, Ctrl-C
  checkpoint.py   the --resume folder (safetensors + JSON)
  loss_log.py     loss JSONL and its PNG plot
  memory.py       the training memory plan (resident, or the fewest blocks streamed that fit)
  streaming.py    streamed blocks in the forward order and again in reverse for the backward
  samples.py      --sample-every: images through the pipeline with the current LoRA, PNG metadata
  api.py          train_lora
"""

from __future__ import annotations

from .api import train_lora
from .loop import TrainingInterrupted
from .settings import TrainSettings

__all__ = ["TrainSettings", "TrainingInterrupted", "train_lora"]
