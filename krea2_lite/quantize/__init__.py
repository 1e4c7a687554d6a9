"""Weight quantization with optimum-quanto: recipe, quantized linear, streaming, on-disk format.

`python -m krea2_lite.quantize --model SRC --dtype int8 --out DIR` writes a self-contained
quantized folder; `load_transformer(path, quant="int8")` quantizes on the fly.
"""

from .qlinear import QuantizedLinear
from .recipe import QuantSpec

__all__ = ["QuantSpec", "QuantizedLinear"]
