"""krea2_lite: run the Krea 2 image transformer exactly, small and fast."""

from .config import Krea2Config
from .metadata import read_png_metadata, save_png
from .model import Krea2Transformer
from .quantize import QuantSpec

from .version import __version__

__all__ = ["Krea2Config", "Krea2Pipeline", "Krea2Transformer", "QuantSpec", "load_transformer", "read_png_metadata",
           "save_png", "__version__"]


def __getattr__(name: str):
    # The loading layer and the pipeline pull in transformers (the text encoder, ~2 s): `import krea2_lite`
    # imports them only when one of these is asked for.
    if name == "Krea2Pipeline":
        from .pipeline import Krea2Pipeline

        return Krea2Pipeline
    if name == "load_transformer":
        from .loading import load_transformer

        return load_transformer
    raise AttributeError(f"module 'krea2_lite' has no attribute {name!r}")
