"""The loading layer: from what a user names to modules in place.

  paths.py         local path or Hugging Face hub id → local path
  files.py         which safetensors files hold a model (index, shards, single file; pickles
                   refused) and their headers → {key: (file, TensorInfo)}; the only place that
                   does either
  stream.py        the one fill routine: meta-built model, group by group, tensors put where
                   the placement says (float, quantized on the fly, or stored quantized)
  transformer.py   `load_transformer`, quantized folders, `describe_transformer`
  text_encoder.py  `load_text_encoder` (Qwen3-VL text path, float or quantized)
  pipeline.py      `resolve_pipeline` (what the user gave → one `PipelineSpec`) and loading it

Lower layers (`checkpoint.py`, `model/`) use `paths` and `files` only, so the names below are
imported on first use: importing `krea2_lite.loading.files` never pulls in the model code.
"""

from __future__ import annotations

_EXPORTS = {
    "resolve_path": "paths", "looks_like_hub_id": "paths",
    "find_weight_files": "files", "tensor_locations": "files", "read_safetensors_header": "files",
    "load_transformer": "transformer", "describe_transformer": "transformer",
    "load_text_encoder": "text_encoder",
    "PipelineSpec": "pipeline", "resolve_pipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'krea2_lite.loading' has no attribute {name!r}")
    from . import files, paths, pipeline, text_encoder, transformer  # explicit, so import checks see them

    modules = {"paths": paths, "files": files, "transformer": transformer, "text_encoder": text_encoder,
               "pipeline": pipeline}
    return getattr(modules[_EXPORTS[name]], name)
