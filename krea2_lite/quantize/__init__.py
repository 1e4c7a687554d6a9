"""Weight quantization: the recipe (`recipe.QuantSpec`), quantized linears (`qlinear`), W8A8
modules, low-rank int4 (`lowrank`), int4 rounding, the quantized skeleton (`skeleton`) and the
text encoder's quantized path.

It imports nothing above it (no `loading`, no `offload`): filling a skeleton from a checkpoint
and writing a quantized folder is `krea2_lite.loading`; the folder's names and manifest are
`krea2_lite.files.quantized_folder`. `python -m krea2_lite.quantize --model SRC --dtype int8 --out DIR`
writes a quantized folder; `load_transformer(path, quant="int8")` quantizes on the fly.
"""

from .qlinear import QuantizedLinear
from .recipe import QuantSpec

__all__ = ["QuantSpec", "QuantizedLinear"]
