"""The bottom layer: every file krea2_lite reads or writes, below everything that uses it.

  paths.py               local path or Hugging Face hub id → local path
  hub_fetch.py           hub ids fetched by need: small files, then exactly the weights a load
                         reads (announced, disk checked); hub_errors.py: one typed HubError each
  jsonfile.py            the one JSON reader (every failure a JsonFileError naming the file)
  dtypes.py              the one dtype table (safetensors names, torch dtypes, sizes) and the
                         compute-dtype check
  safetensors_headers.py one safetensors file: header validated, tensors read
  weight_files.py        which safetensors files hold a model (index, shards, single file; pickles
                         refused) and their headers → {key: (file, TensorInfo)}
  checkpoint.py          transformer checkpoint layouts (official / ComfyUI / diffusers) → official names
  gguf_container.py      GGUF files (the `gguf` package's reader): types, shapes, byte ranges checked
  comfy_layouts.py       ComfyUI quantized safetensors: which layers, which format, scale checks
  quantized_folder.py    the quantized folder's names and manifest
  shard_writer.py        safetensors shards written as tensors arrive
  small_tensor_file.py   a small safetensors file read whole (training caches, checkpoints)

It imports nothing of the package but `errors`. Every error names the file it is about.
"""

from .jsonfile import read_json
from .paths import looks_like_hub_id, resolve_path
from .safetensors_headers import TensorInfo, read_safetensors_header
from .weight_files import find_weight_files, tensor_locations

__all__ = ["TensorInfo", "find_weight_files", "looks_like_hub_id", "read_json", "read_safetensors_header",
           "resolve_path", "tensor_locations"]
