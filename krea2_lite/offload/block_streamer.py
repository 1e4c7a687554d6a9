"""Sequential offload of transformer blocks: host copies, a few reused device slots, a copy stream.

Each streamed block's tensors live in one flat pinned host buffer. On the device there are only
`prefetch + 1` flat slots, allocated once. While block j computes, the copy stream fills the slot of
block j + prefetch; CUDA events order each copy after the compute that last read its slot and each
compute after its copy. Between uses a streamed block is bound to its host copy, so `state_dict()`
still returns the right values. On a CPU "device" the same bookkeeping runs with synchronous copies.

Training also runs the blocks backwards (each block's forward recomputed inside the backward):
`start(direction=-1)` prefetches the last blocks, `fetch(block, -1)` puts one on the device while the
one before it is copied, and `evict(block)` hands its slot back once its backward has been queued.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .tensor_slots import FlatLayout, tensor_slots


class BlockStreamer:
    """Streams `blocks[i]` for i in `streamed` through reused device slots during each forward.

    `root` is the module whose forward runs the blocks in index order (the transformer): its
    forward pre-hook starts the first copies so they overlap whatever runs before the blocks.
    """

    def __init__(self, root: nn.Module, blocks: nn.ModuleList, streamed, device: torch.device, prefetch: int = 1):
        self.device = torch.device(device)
        self.order = list(streamed)
        if not self.order:
            raise ValueError("BlockStreamer needs at least one streamed block")
        self.prefetch = prefetch
        self.cuda = self.device.type == "cuda"
        self.slots_of = {}  # block index → its Slot list
        self.host = {}  # block index → flat host buffer
        self.host_views = {}
        self.layouts = {}  # block index → its FlatLayout (blocks of a mixed-type GGUF file differ)
        for i in self.order:
            slots = tensor_slots(blocks[i])
            layout = FlatLayout.of(slots)
            flat = torch.empty(layout.size, dtype=torch.uint8, pin_memory=self.cuda)
            views = layout.views(flat)
            for slot, view in zip(slots, views):
                view.copy_(slot.get())
                slot.bind(view)  # the original host tensor is released here
            self.slots_of[i], self.host[i], self.host_views[i], self.layouts[i] = slots, flat, views, layout
        self.slot_size = max(layout.size for layout in self.layouts.values())
        count = min(prefetch + 1, len(self.order))
        self.device_flat = [torch.empty(self.slot_size, dtype=torch.uint8, device=self.device) for _ in range(count)]
        self._device_views = {}  # (slot, block) → views of that block's layout in that slot
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event() for _ in range(count)]
            self.free = [torch.cuda.Event() for _ in range(count)]
        self.position = {block: j for j, block in enumerate(self.order)}
        self.pending: set[int] = set()
        self.bound: set[int] = set()  # blocks bound to a device slot now
        self.copies = 0  # blocks copied host → device so far (tests and benchmarks count them)
        self.gate_at: int | None = None  # see hold_from
        self.gate_open = True
        self.handles = [root.register_forward_pre_hook(lambda *_: self.start())]
        for i in self.order:
            self.handles.append(blocks[i].register_forward_pre_hook(self._before_hook(i)))
            self.handles.append(blocks[i].register_forward_hook(self._after_hook(i)))

    # ---- bookkeeping ----------------------------------------------------------------------
    @property
    def layout(self) -> FlatLayout:
        """The largest streamed block's layout (the one a device slot is sized for)."""
        return max(self.layouts.values(), key=lambda layout: layout.size)

    @property
    def slot_bytes(self) -> int:
        return self.slot_size * len(self.device_flat)

    @property
    def host_bytes(self) -> int:
        return sum(self.layouts[i].size for i in self.order)

    def device_views(self, slot: int, block: int) -> list[torch.Tensor]:
        key = (slot, block)
        if key not in self._device_views:
            self._device_views[key] = self.layouts[block].views(self.device_flat[slot])
        return self._device_views[key]

    def _slot(self, j: int) -> int:
        return j % len(self.device_flat)

    def hold_from(self, block: int | None) -> None:
        """From the next forward on, copies of blocks with index ≥ `block` wait for `release()` in each
        forward (a step cache decides after the first blocks whether the rest run); None: never wait."""
        self.gate_at = block

    def release(self) -> None:
        """The held blocks will run in this forward: copy the first ones now."""
        self.gate_open = True
        held = [j for j, block in enumerate(self.order) if block >= self.gate_at] if self.gate_at is not None else []
        for j in held[:self.prefetch]:
            self._issue(j)

    def _issue(self, j: int, force: bool = False) -> None:
        """Copy streamed block number j (in stream order) into its slot (unless held, see hold_from)."""
        if not 0 <= j < len(self.order) or j in self.pending:
            return
        if not (force or self.gate_open) and self.order[j] >= self.gate_at:
            return
        slot, block = self._slot(j), self.order[j]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])
                self.device_flat[slot][:self.host[block].numel()].copy_(self.host[block], non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        else:
            self.device_flat[slot][:self.host[block].numel()].copy_(self.host[block])
        self.pending.add(j)
        self.copies += 1

    def start(self, direction: int = 1) -> None:
        """A pass begins: put every streamed block back on its host copy, prefetch the first ones (the
        last ones when `direction` is -1: a backward pass)."""
        for i in self.order:
            for slot, view in zip(self.slots_of[i], self.host_views[i]):
                slot.bind(view)
        self.pending.clear()
        self.bound.clear()
        self.gate_open = self.gate_at is None
        count = min(self.prefetch, len(self.order))
        for j in (range(count) if direction > 0 else range(len(self.order) - 1, len(self.order) - 1 - count, -1)):
            self._issue(j)

    def fetch(self, block: int, direction: int = 1) -> None:
        """Streamed `block` on the device and bound to its slot (waiting for its copy); the next `prefetch`
        streamed blocks in `direction` (+1 forward order, -1 backward) start copying meanwhile."""
        j = self.position[block]
        self._issue(j, force=True)  # no-op when prefetched; a block called out of order is fetched now
        for ahead in range(j + direction, j + direction * (1 + self.prefetch), direction):
            if self._slot(ahead) != self._slot(j):
                self._issue(ahead)
        slot = self._slot(j)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        for s, view in zip(self.slots_of[block], self.device_views(slot, block)):
            s.bind(view)
        self.bound.add(block)

    def evict(self, block: int) -> None:
        """`block`'s work on its slot is queued: the slot may be refilled after it; the block reads its host copy."""
        j = self.position[block]
        slot = self._slot(j)
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        for s, view in zip(self.slots_of[block], self.host_views[block]):
            s.bind(view)
        self.pending.discard(j)
        self.bound.discard(block)

    def _before_hook(self, block: int):
        def hook(module, args):
            self.fetch(block)
        return hook

    def _after_hook(self, block: int):
        def hook(module, args, output):
            self.evict(block)
        return hook

    def close(self) -> None:
        """Remove the hooks; streamed blocks stay bound to their host copies (plain CPU tensors)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        for i in self.order:
            for slot, view in zip(self.slots_of[i], self.host_views[i]):
                slot.bind(view)
        self.device_flat, self._device_views = [], {}
