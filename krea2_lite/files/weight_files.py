"""Which safetensors files hold a model: the one place that decides it, and reads their headers.

`find_weight_files` is the only routine that looks for weights in a folder (an index, single or
several files, refused pickles) and `tensor_locations` the only one that reads their headers into
{key: (file, TensorInfo)}; every loader (transformer, text encoder, VAE, quantized folder) goes
through both. Pickle-based files are refused by name and never opened. What this guards against:
the same tensor in two files (whichever was read last won), an index whose `weight_map` was
ignored. Every error names the file (or both files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointNotFoundError, SafetensorsSetError, UnsafeCheckpointFormatError
from .jsonfile import get_typed, read_json
from .safetensors_headers import TensorInfo, read_safetensors_header

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
INDEX_SUFFIX = ".safetensors.index.json"


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointFormatError(
            f"{path}: '{path.suffix}' files are pickle-based and are never opened by krea2_lite "
            "(unpickling can run arbitrary code). Convert the checkpoint to .safetensors first.")


@dataclass
class WeightFiles:
    """The safetensors files of one model, and the shard index's {key: file} when there is one."""

    folder: Path
    files: list[Path]
    weight_map: dict[str, Path] | None = None
    index: Path | None = None


def read_weight_map(index: Path) -> dict[str, str]:
    """{tensor key: shard file name} from a `*.safetensors.index.json`, every entry checked."""
    data = read_json(index, required=("weight_map",), what="shard index")
    weight_map = get_typed(data, "weight_map", dict, where=str(index), default={})
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise SafetensorsSetError(f"{index}: weight_map['{key}'] must be a file name in the same folder, "
                                      f"got {name!r}")
    return weight_map


def _from_index(index: Path) -> WeightFiles:
    weight_map = read_weight_map(index)  # a JSON object of key → plain shard file name, or a clear error
    folder = index.parent
    shards = {name: folder / name for name in weight_map.values()}
    missing = sorted(name for name, p in shards.items() if not p.is_file())
    if missing:
        raise CheckpointNotFoundError(f"{index}: lists shards that are missing: {missing[:3]}")
    return WeightFiles(folder, sorted(set(shards.values())), {k: shards[v] for k, v in weight_map.items()}, index)


def find_weight_files(location: Path, *, preferred: str | None = None, single: bool = False,
                      what: str = "model") -> WeightFiles:
    """The safetensors weights at `location` (a file, or a folder).

    In a folder, in this order: the index `preferred + ".index.json"` or else the only
    `*.safetensors.index.json`; the file `preferred`; every `*.safetensors` (only one allowed
    with `single`). A folder holding only pickle files is refused by name.
    """
    if location.is_file():
        refuse_pickle(location)
        return WeightFiles(location.parent, [location])
    indexes = sorted(location.glob("*" + INDEX_SUFFIX))
    if preferred is not None and (location / (preferred + ".index.json")).is_file():
        return _from_index(location / (preferred + ".index.json"))
    if len(indexes) > 1:
        raise CheckpointNotFoundError(f"{location}: several shard indexes ({', '.join(p.name for p in indexes)}); "
                                      "pass the folder of one model")
    if indexes:
        return _from_index(indexes[0])
    if preferred is not None and (location / preferred).is_file():
        return WeightFiles(location, [location / preferred])
    files = sorted(location.glob("*.safetensors"))
    if single and len(files) > 1:
        raise CheckpointNotFoundError(f"{location}: several .safetensors files "
                                      f"({', '.join(f.name for f in files)}) and no *{INDEX_SUFFIX}")
    if files:
        return WeightFiles(location, files)
    pickles = sorted(p.name for p in location.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointFormatError(
            f"{location}: only pickle-based weights ({', '.join(pickles[:4])}); krea2_lite never unpickles "
            "(it can run arbitrary code). Convert them to .safetensors first.")
    raise CheckpointNotFoundError(f"{location}: no {what} found (expected a .safetensors file or a sharded "
                                  f"*{INDEX_SUFFIX})")


def tensor_locations(weights: WeightFiles) -> dict[str, tuple[Path, TensorInfo]]:
    """{stored key: (file, TensorInfo)} from the headers of `weights` (tensor data is not read).

    With an index, its weight_map says which file holds each key (a key it does not list, or one
    its file lacks, is an error); without one, a key in two files is refused rather than one copy
    winning silently.
    """
    found: dict[str, tuple[Path, TensorInfo]] = {}
    for file in weights.files:
        for key, info in read_safetensors_header(file).items():
            if weights.weight_map is not None:
                if weights.weight_map.get(key) == file:
                    found[key] = (file, info)
                continue
            if key in found:
                raise SafetensorsSetError(f"tensor '{key}' is in both {found[key][0]} and {file}; "
                                          "pass one file, or add an index saying which holds it")
            found[key] = (file, info)
    if weights.weight_map is not None:
        absent = sorted(k for k in weights.weight_map if k not in found)
        if absent:
            raise SafetensorsSetError(f"{weights.index}: lists {len(absent)} tensor(s) their shard does not hold "
                                      f"(first: {absent[:3]})")
    return found
