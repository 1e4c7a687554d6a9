"""Model definitions: the Krea 2 transformer (and, as they land, the text encoder and VAE)."""

from .transformer import Krea2Transformer

__all__ = ["Krea2Transformer"]
