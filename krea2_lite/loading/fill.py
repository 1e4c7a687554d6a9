"""The one routine that fills a meta-built model: group by group (a transformer block, or a
top-level module), each tensor read from its file and put where the placement says.

What differs between a float checkpoint, quantizing on the fly and a quantized folder is only
how a read tensor is set into the model (`FloatSetter`, `QuantizingSetter`, `StoredSetter`, and the
text encoder's `TextEncoderSetter`); the order, the reading and the placement are shared. A
caller iterating `fill_groups` sees each group complete, so it can write the group out and drop
it (the quantized-folder writer) before the next is read. This is the only code that reads
weight tensors into a model (`tests/test_import_graph.py` checks that nothing else calls
`safe_open`, `get_tensor` or `load_state_dict`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import CorruptCheckpointError, NonFiniteError
from ..files.checkpoint import keeps_fp32
from ..files.safetensors_headers import TensorInfo, open_safetensors, read_tensor

Entry = tuple[Path, str, TensorInfo]  # (file, stored key, header info)


# Module lists whose items are groups of their own: the transformer's blocks, the text encoder's layers.
LISTS = ("blocks", "layers")


def group_of(name: str) -> str:
    """`blocks.3.attn.wq.weight` → `blocks.3`; `txtfusion.projector.weight` → `txtfusion`."""
    head, _, rest = name.partition(".")
    return f"{head}.{rest.partition('.')[0]}" if head in LISTS else head


def model_groups(model: nn.Module) -> list[str]:
    """The model's groups in module order (each block / layer on its own)."""
    groups = []
    for name, child in model.named_children():
        groups += [f"{name}.{i}" for i in range(len(child))] if name in LISTS else [name]
    return groups


def placement(device: torch.device, device_blocks: Collection[int] | None) -> Callable[[str], torch.device]:
    """Where each group lives: `device`, except blocks outside `device_blocks` (when given), which
    stay in host memory (a memory plan streams or swaps them from there)."""
    if device_blocks is None:
        return lambda group: device
    resident = {f"blocks.{i}" for i in device_blocks}
    host = torch.device("cpu")
    return lambda group: device if not group.startswith("blocks.") or group in resident else host


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Bind `tensor` as the parameter or buffer `name` (parameters without gradients)."""
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def policy_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Norm scales and modulation tables stay float32 whatever the model dtype."""
    return torch.float32 if keeps_fp32(name) else dtype


def cast_meta_(model: nn.Module, dtype: torch.dtype, skip: Collection[str] = ()) -> nn.Module:
    """Give a meta-built model's float tensors the dtypes loading will give them (modules in
    `skip`, the quantized ones, keep theirs), so its meta state describes the loaded one."""
    for mname, module in model.named_modules():
        if mname in skip:
            continue
        for leaf, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and t.is_floating_point():
                name = f"{mname}.{leaf}" if mname else leaf
                set_tensor(model, name, t.to(policy_dtype(name, dtype)))
    return model


class FloatSetter:
    """Official-layout float tensors, cast by the dtype policy (diffusers' (6, d) tables flattened)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device) -> None:
        if name.endswith("mod.lin") and tensor.ndim == 2 and name != "last.modulation.lin":
            tensor = tensor.reshape(-1)
        set_tensor(model, name, tensor.to(device=device, dtype=policy_dtype(name, self.dtype)))

    def finish_group(self, group: str) -> None:
        pass


class QuantizingSetter(FloatSetter):
    """Float tensors as FloatSetter; the weight (and bias) of each QuantizedLinear quantized on `device`
    once both are read."""

    def __init__(self, dtype: torch.dtype, quantized: dict[str, nn.Module]):
        super().__init__(dtype)
        self.quantized, self.pending = quantized, {}

    def __call__(self, model, name, tensor, device) -> None:
        owner, _, leaf = name.rpartition(".")
        module = self.quantized.get(owner)
        if module is None or leaf not in ("weight", "bias"):
            return super().__call__(model, name, tensor, device)
        parts = self.pending.setdefault(owner, {})
        parts[leaf] = tensor.to(device)
        if "weight" in parts and ("bias" in parts or module.bias is None):
            module.set_weight(parts["weight"], parts.get("bias"))
            del self.pending[owner]

    def finish_group(self, group: str) -> None:
        if self.pending:  # cannot happen for a checked checkpoint: every weight and bias was listed
            raise RuntimeError(f"{group}: incomplete quantized layers {sorted(self.pending)[:3]}")


_CHECKED_SUFFIXES = ("._scale", "._shift", ".lowrank.up", ".lowrank.down", ".lowrank.up.weight",
                     ".lowrank.down.weight")


def check_stored_values(key: str, tensor: torch.Tensor) -> None:
    """A cheap load-time check of a quantized layer's small float tensors (scales, shifts, low-rank
    factors): NaN / inf is a NonFiniteError naming the tensor, and scales that are all zero or any
    negative (absmax / min-max scales never are) a CorruptCheckpointError: both would draw garbage."""
    if not tensor.is_floating_point() or not key.endswith(_CHECKED_SUFFIXES):
        return
    values = tensor.float()
    if not torch.isfinite(values).all():
        raise NonFiniteError(f"{key}: the stored tensor holds NaN or inf (the quantized folder is damaged)")
    if key.endswith("._scale") and (not (values != 0).any() or (values < 0).any()):
        raise CorruptCheckpointError(f"{key}: stored scales are all zero or negative (the quantized folder is "
                                     "damaged or was edited)")


class StoredSetter:
    """A krea2_lite quantized folder's tensors: stored values (int8 / fp8 / int4 codes) kept exactly,
    float tensors cast by the dtype policy. `targets` maps each on-disk key to the model's name."""

    def __init__(self, dtype: torch.dtype, targets: dict[str, str], exact: Collection[str]):
        self.dtype, self.targets, self.exact = dtype, targets, set(exact)

    def __call__(self, model, key, tensor, device) -> None:
        name = self.targets[key]
        check_stored_values(key, tensor)
        if tensor.is_floating_point() and name not in self.exact:
            tensor = tensor.to(policy_dtype(key, self.dtype))
        set_tensor(model, name, tensor.to(device))

    def finish_group(self, group: str) -> None:
        pass


class TensorReader:
    """Reads tensors memory-mapped (`mmap=True`: a tensor already in its final dtype stays a view of
    the file's pages) or with a plain read into fresh memory (for quantizing: released with it)."""

    def __init__(self, mmap: bool):
        self.mmap, self.handles = mmap, {}

    def __call__(self, file: Path, key: str, info: TensorInfo) -> torch.Tensor:
        if not self.mmap:
            return read_tensor(file, info)
        if file not in self.handles:
            self.handles[file] = open_safetensors(file)
        try:
            return self.handles[file].get_tensor(key)
        except Exception as exc:  # safetensors' own error type, which does not name the file
            raise CorruptCheckpointError(f"{file}: cannot read tensor {key!r} ({exc})") from None

    def close(self) -> None:
        self.handles.clear()


def fill_groups(model: nn.Module, entries: dict[str, Entry], put, *, place: Callable[[str], torch.device],
                mmap: bool, progress: bool | None = None, desc: str = "loading", reader=None) -> Iterator[str]:
    """Fill `model` (built on the meta device) from `entries` {model name: (file, key, info)}, one
    group at a time in module order; yields each group's name once all its tensors are in place.
    Within a group tensors are read in file order. `reader` (file, key, info) → tensor replaces the
    safetensors reader (a GGUF file's, `loading.gguf`)."""
    from tqdm.auto import tqdm

    by_group: dict[str, list[str]] = {}
    for name in entries:
        by_group.setdefault(group_of(name), []).append(name)
    order = [g for g in model_groups(model) if g in by_group] + [g for g in by_group if g not in model_groups(model)]
    reader = reader or TensorReader(mmap)
    bar = tqdm(total=len(entries), desc=desc, unit="tensor", leave=False,
               disable=(not progress) if progress is not None else None)
    try:
        with bar:
            for group in order:
                device = place(group)
                for name in sorted(by_group[group], key=lambda n: (str(entries[n][0]), entries[n][2].start)):
                    file, key, info = entries[name]
                    tensor = reader(file, key, info)
                    put(model, name, tensor, device)
                    del tensor
                    bar.update()
                put.finish_group(group)
                yield group
                release_freed_memory()  # the caller may have written and dropped the group
    finally:
        reader.close()


def release_freed_memory() -> None:
    """Hand memory freed since the last group back to the OS. glibc keeps freed mid-sized tensors
    (below its adaptive mmap threshold) in the heap, so without this a block-by-block quantize run's
    RSS grew by about one block per block (measured: +40–110 MB per block at width 1536, flat with it)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only; elsewhere there is nothing to do
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def unloaded(model: nn.Module) -> list[str]:
    """Names of tensors still on the meta device (a guard on the load plan itself)."""
    return [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t is not None and t.is_meta]
