"""Attach a step cache to a transformer, and remove it: the model's code is never changed.

How it hooks in: the transformer's forward runs `for block in self.blocks: x = block(x, ...)`.
`attach_cache` swaps `transformer.blocks` for `CachedBlocks`, a ModuleList subclass holding the
very same block modules (so `state_dict()` keys, LoRA hooks, quantized layers and the streamer's
per-block hooks are untouched). A forward pre-hook on the transformer arms it with the step's flow
time; while armed, iterating it yields the first F blocks (the first one wrapped to keep its input,
the F-th to keep its output), then, once those have run, either a single stand-in that adds the
cached residual (skip) or the remaining blocks (the last wrapped to store their residual).
Skipped blocks are never called, so no hook of theirs runs: a streamed block is not copied.
Outside an armed forward, iteration is the plain ModuleList's.

Streaming: `gate` (offload.block_streamer.BlockStreamer) is told to hold every copy of a block at index
≥ F until the decision: `release()` on a computed step. On a skipped step nothing after block F−1
was copied, so no copy is wasted; the price is that on a computed step the copy of the first
streamed block after F starts only when the decision is known (no overlap for that one block).
"""

from __future__ import annotations

import torch.nn as nn

from .spec import CacheSpec
from .state import CacheState


class CachedBlocks(nn.ModuleList):
    """`transformer.blocks` while a cache is attached (same modules, same names)."""

    _cache: "StepCache"
    _armed: float | None

    def __iter__(self):
        t, self._armed = self._armed, None
        if t is None:
            return super().__iter__()
        return self._cache._step(list(self._modules.values()), t)


def _swapped_list(blocks: nn.ModuleList, cls: type) -> nn.ModuleList:
    """`blocks` re-made as `cls` with the very same submodules (the W8A8 swap's idiom)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v for k, v in blocks.__dict__.items() if k not in ("_cache", "_armed")})
    return new


class StepCache:
    """A cache attached to one transformer. `state` has the decisions and counters; `remove()`
    (or leaving the `with` block) restores the plain ModuleList and the gate."""

    def __init__(self, transformer: nn.Module, spec: CacheSpec, *, gate=None, per_half: bool = False,
                 steps: int | None = None):
        if isinstance(transformer.blocks, CachedBlocks):
            raise RuntimeError("a step cache is already attached to this transformer")
        self.transformer, self.spec, self.gate = transformer, spec, gate
        self.state = CacheState(spec, len(transformer.blocks), per_half=per_half)
        self.state.begin(steps)
        blocks = _swapped_list(transformer.blocks, CachedBlocks)
        blocks._cache, blocks._armed = self, None
        transformer.blocks = blocks
        self.handles = [transformer.register_forward_pre_hook(self._arm, with_kwargs=True),
                        transformer.register_forward_hook(self._disarm, always_call=True)]
        if gate is not None:
            gate.hold_from(spec.first)

    # ---- per forward --------------------------------------------------------------------------
    def _arm(self, module, args, kwargs):
        t = args[2] if len(args) > 2 else kwargs["t"]
        self.transformer.blocks._armed = float(t.reshape(-1)[0])

    def _disarm(self, module, args, output):
        if isinstance(self.transformer.blocks, CachedBlocks):
            self.transformer.blocks._armed = None

    def _step(self, blocks: list[nn.Module], t: float):
        """The block sequence of one forward (a generator: it resumes after each yielded call)."""
        first, state, kept = self.spec.first, self.state, {}

        def head(x, *rest):
            kept["input"] = x
            out = blocks[0](x, *rest)
            if first == 1:
                kept["output"] = out
            return out

        def last_of_first(x, *rest):
            kept["output"] = out = blocks[first - 1](x, *rest)
            return out

        yield head
        if first > 1:
            yield from blocks[1:first - 1]
            yield last_of_first
        first_residual = kept["output"] - kept["input"]
        if state.decide(first_residual):
            residual = state.predict(t)
            state.skipped()
            yield lambda x, *rest: x + residual
            return
        if self.gate is not None:
            self.gate.release()
        yield from blocks[first:-1]

        def tail(x, *rest):
            out = blocks[-1](x, *rest)
            state.computed(t, first_residual, out - kept["output"])
            return out

        yield tail

    # ---- lifetime -----------------------------------------------------------------------------
    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if isinstance(self.transformer.blocks, CachedBlocks):
            self.transformer.blocks = _swapped_list(self.transformer.blocks, nn.ModuleList)
        if self.gate is not None:
            self.gate.hold_from(None)
            self.gate = None

    def __enter__(self) -> "StepCache":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_cache(transformer: nn.Module, spec: CacheSpec, *, gate=None, per_half: bool = False,
                 steps: int | None = None) -> StepCache:
    """Attach a step cache (see the module docstring); `steps` enables the `tail` rule."""
    return StepCache(transformer, spec, gate=gate, per_half=per_half, steps=steps)
