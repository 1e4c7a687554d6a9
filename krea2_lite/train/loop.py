"""The training loop: steps of K accumulated micro-batches, AdamW on the LoRA parameters only,
gradient clipping, saves at --save-every and at the end, NaN → stop with the last good save kept,
Ctrl-C → save and `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import Krea2LiteError, NonFiniteError
from . import loss_log
from .base_model import training_forward
from .cache import read_example
from .checkpoint import save_checkpoint
from .objective import flow_loss
from .order import DataOrder


class TrainingInterrupted(Krea2LiteError, KeyboardInterrupt):
    """Ctrl-C during training: the last completed step was saved (the CLI exits 130)."""


@dataclass
class Run:
    model: torch.nn.Module
    lora: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    order: DataOrder
    examples: list
    settings: object
    shift: dict
    device: torch.device
    identity: dict
    streaming: object = None  # train.streaming.StreamedTraining when blocks stream
    sampler: object = None  # train.samples.Sampler with --sample-every
    step: int = 0
    losses: list = field(default_factory=list)

    @property
    def params(self) -> list:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def micro_batch(run: Run) -> torch.Tensor:
    indices = run.order.next()
    latents, texts = [], []
    for index in indices:
        flipped = bool(run.settings.flip) and bool(torch.rand((), generator=run.generator) < 0.5)
        latent, text = read_example(run.examples[index], flipped)
        latents.append(latent)
        texts.append(text)
    return flow_loss(run.model, torch.stack(latents), texts, run.generator, run.shift, run.device)


def train_step(run: Run) -> float:
    """One optimizer step; returns the mean loss of its micro-batches. NaN/inf → NonFiniteError."""
    k = run.settings.grad_accum
    total = 0.0
    for _ in range(k):
        loss = micro_batch(run)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss became {float(loss.detach())} at step {run.step + 1}; stopped without "
                                 f"applying it (the last good save is step {_last_save(run)})")
        with run.streaming.backward() if run.streaming is not None else contextlib.nullcontext():
            (loss / k).backward()
        total += float(loss.detach()) / k
    torch.nn.utils.clip_grad_norm_(run.params, run.settings.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return total


def _last_save(run: Run) -> int:
    every = run.settings.save_every
    return (run.step // every) * every if every else 0


def save(run: Run) -> None:
    settings = run.settings
    run.lora.save(settings.output, {"step": run.step, "steps": settings.steps})
    save_checkpoint(settings.checkpoint_path, lora=run.lora, optimizer=run.optimizer, params=run.params,
                    generator=run.generator, progress={"step": run.step, **run.order.state()}, identity=run.identity)
    jsonl, png = loss_log.log_paths(Path(settings.output))
    loss_log.draw(jsonl, png)


def train_loop(run: Run, *, log=print) -> None:
    from tqdm.auto import tqdm

    settings = run.settings
    jsonl, _ = loss_log.log_paths(Path(settings.output))
    loss_log.truncate(jsonl, run.step)
    smooth, snapshot = None, (run.generator.get_state(), run.order.state())
    start = time.perf_counter()
    with training_forward(run.model, streaming=run.streaming), tqdm(total=settings.steps, initial=run.step, desc="training", unit="step",
                                           disable=not settings.progress) as bar:
        try:
            while run.step < settings.steps:
                snapshot = (run.generator.get_state(), run.order.state())
                loss = train_step(run)
                smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
                loss_log.append(jsonl, {"step": run.step, "loss": loss, "time": time.perf_counter() - start})
                bar.set_postfix(loss=f"{smooth:.4f}")
                bar.update()
                if settings.save_every and run.step % settings.save_every == 0 and run.step < settings.steps:
                    save(run)
                if run.sampler is not None and run.sampler.due(run.step):
                    run.sampler.draw(run.step)
        except KeyboardInterrupt:
            run.optimizer.zero_grad(set_to_none=True)  # the unfinished step is dropped, its draws rewound
            run.generator.set_state(snapshot[0])
            run.order.epoch, run.order.position = snapshot[1]["epoch"], snapshot[1]["position"]
            save(run)
            raise TrainingInterrupted(f"interrupted: saved step {run.step} to {settings.output} and "
                                      f"{settings.checkpoint_path} (resume with --resume)") from None
    save(run)
    if math.isfinite(smooth or 0.0):
        log(f"trained {run.step} steps; smoothed loss {smooth:.4f}; LoRA written to {settings.output}")
