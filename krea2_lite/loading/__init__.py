"""The loading layer: from what a user names to modules in place, and back to files.

  fill.py               the one fill routine: meta-built model, group by group, each tensor set
                        where the placement says (float, quantized on the fly, or stored quantized)
  transformer_config.py a transformer's config inferred from its shapes; keys and shapes checked
  transformer.py        `load_transformer`, quantized folders, `describe_transformer`
  text_encoder.py       `load_text_encoder` (Qwen3-VL text path, float or quantized)
  vae.py                `load_vae_decoder` (the Qwen-Image VAE decoder)
  quantized_writer.py   the quantized-folder writer (a loader run backwards)
  text_encoder_folder.py a text encoder saved as a folder; its quantization info read back
  pipeline.py           `resolve_pipeline` (what the user gave → one `PipelineSpec`)

It sits above `model/` and `quantize/`; finding files and reading headers is `krea2_lite.files`.
"""

from __future__ import annotations

from .pipeline import PipelineSpec, resolve_pipeline
from .text_encoder import load_text_encoder
from .transformer import describe_transformer, load_transformer
from .vae import load_vae_decoder

__all__ = ["PipelineSpec", "describe_transformer", "load_text_encoder", "load_transformer", "load_vae_decoder",
           "resolve_pipeline"]
