"""krea2_lite: run the Krea 2 image transformer exactly, small and fast."""

from .checkpoint import load_transformer
from .config import Krea2Config
from .model import Krea2Transformer

__version__ = "0.1.0"

__all__ = ["Krea2Config", "Krea2Transformer", "load_transformer", "__version__"]
