"""krea2_lite: run the Krea 2 image transformer exactly, small and fast."""

from .loading.transformer import load_transformer
from .loading.vae_encoder import load_vae_encoder
from .config import Krea2Config
from .metadata import read_png_metadata, save_png
from .model import Krea2Transformer
from .quantize import QuantSpec

from .version import __version__

__all__ = ["Krea2Config", "Krea2Pipeline", "Krea2Transformer", "QuantSpec", "load_transformer", "load_vae_encoder",
           "read_png_metadata",
           "save_png", "__version__"]


def __getattr__(name: str):
    # The pipeline pulls in transformers (the text encoder); import it only when asked for.
    if name == "Krea2Pipeline":
        from .pipeline import Krea2Pipeline

        return Krea2Pipeline
    raise AttributeError(f"module 'krea2_lite' has no attribute {name!r}")
