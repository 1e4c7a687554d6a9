"""GGUF transformers load as stored: GGUFLinear layers hold the file's blocks; the forward equals a
model built from the `gguf` package's dequantized tensors; bad files are typed errors."""

import numpy as np
import pytest
import torch

from factories import random_inputs
from gguf_files import QUANT_TYPES, model_gguf, random_model_state, write_gguf
from krea2_lite import Krea2Config, load_transformer
from krea2_lite.errors import GGUFFileError, UnsupportedFormatError
from krea2_lite.model import Krea2Transformer
from krea2_lite.quantize.gguf_linear import GGUFLinear

# Width 256 so every block linear holds whole K-quant blocks (256 elements).
CFG = Krea2Config.tiny(features=256, tdim=256, txtdim=256, layers=2)


@pytest.fixture(scope="module")
def state():
    return random_model_state(CFG, seed=2)


def reference_forward(reference: dict, inputs) -> torch.Tensor:
    with torch.device("meta"):
        model = Krea2Transformer(CFG)
    model.load_state_dict(reference, assign=True)
    with torch.no_grad():
        return model.eval()(*inputs)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_forward_equals_the_package_dequantization(tmp_path, state, qtype, single_thread):
    path, reference = model_gguf(tmp_path / "m.gguf", state, qtype)
    model = load_transformer(path, dtype=torch.float32)
    linears = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert linears and all(m.qtype == qtype for m in linears)
    inputs = random_inputs(CFG, 1, 3, 2, 2)
    with torch.no_grad():
        ours = model(*inputs)
    torch.testing.assert_close(ours, reference_forward(reference, inputs), rtol=1e-5, atol=1e-5)


def test_stored_bytes_stay_mapped_and_memory_is_the_file(tmp_path, state):
    path, _ = model_gguf(tmp_path / "m.gguf", state, "Q4_K")
    model = load_transformer(path, dtype=torch.float32)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    size = path.stat().st_size
    assert 0.9 * size < held < 1.05 * size  # the stored blocks, not a dequantized copy
    layer = model.blocks[0].mlp.up
    assert isinstance(layer, GGUFLinear) and layer.qtype == "Q4_K"
    assert mapped_from(layer.qdata.data_ptr()) == str(path)  # a view of the file's pages, not a copy


def mapped_from(address: int) -> str | None:
    """The file whose memory map holds `address` (Linux /proc/self/maps), else None."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        pytest.skip("needs /proc/self/maps")
    for line in lines:
        parts = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in parts[0].split("-"))
        if low <= address < high:
            return parts[5] if len(parts) > 5 else None
    return None


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusers"])
def test_comfyui_and_diffusers_names(tmp_path, state, prefix):
    from krea2_lite.files.checkpoint import _DIFFUSERS_INFIXES, _DIFFUSERS_PREFIXES

    def to_diffusers(key):
        for new, old in _DIFFUSERS_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        for new, old in _DIFFUSERS_INFIXES:
            key = key.replace(old, new)
        return key

    if prefix == "diffusers":
        path, reference = model_gguf(tmp_path / "m.gguf", state, "Q8_0", rename=to_diffusers)
    else:
        path, reference = model_gguf(tmp_path / "m.gguf", state, "Q8_0", prefix=prefix)
    model = load_transformer(path, dtype=torch.float32)
    inputs = random_inputs(CFG, 1, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), reference_forward(reference, inputs), rtol=1e-5, atol=1e-5)


# ---- bad files: each a typed error naming the file and the tensor, before anything is placed ----

def small_file(tmp_path, **extra):
    tensors = {"aa.weight": ("Q8_0", np.zeros((2, 34), np.uint8)), "ab.weight": ("F32", np.ones(4, np.float32))}
    tensors.update(extra)
    return write_gguf(tmp_path / "bad.gguf", tensors)


def patch_info(path, name: bytes, *, type_code=None, dim0=None, new_name=None):
    """Rewrite one tensor-info record in place: its ggml type, innermost dimension or name."""
    data = bytearray(path.read_bytes())
    at = data.find(name)
    n_dims = int.from_bytes(data[at + len(name):at + len(name) + 4], "little")
    dims_at = at + len(name) + 4
    if new_name is not None:
        data[at:at + len(name)] = new_name
    if dim0 is not None:
        data[dims_at:dims_at + 8] = dim0.to_bytes(8, "little")
    if type_code is not None:
        type_at = dims_at + 8 * n_dims
        data[type_at:type_at + 4] = type_code.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def test_truncated_file_is_named(tmp_path):
    path = small_file(tmp_path, **{"ac.weight": ("Q8_0", np.zeros((64, 34), np.uint8))})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GGUFFileError, match=r"bad\.gguf.*'ac\.weight'.*truncated"):
        load_transformer(path)


def test_duplicate_names_are_refused(tmp_path):
    path = patch_info(small_file(tmp_path), b"ab.weight", new_name=b"aa.weight")
    with pytest.raises(GGUFFileError, match=r"bad\.gguf.*'aa\.weight'.*twice"):
        load_transformer(path)


def test_unknown_and_unsupported_types_are_named(tmp_path):
    path = patch_info(small_file(tmp_path), b"aa.weight", type_code=250)
    with pytest.raises(UnsupportedFormatError, match=r"bad\.gguf.*'aa\.weight'.*type 250"):
        load_transformer(path)
    path = patch_info(small_file(tmp_path), b"aa.weight", type_code=16)  # IQ2_XXS: real, not supported here
    with pytest.raises(UnsupportedFormatError, match=r"'aa\.weight' is stored as IQ2_XXS"):
        load_transformer(path)


def test_bytes_that_do_not_fit_type_and_shape(tmp_path):
    path = patch_info(small_file(tmp_path), b"aa.weight", dim0=33)  # not a whole number of 32-element blocks
    with pytest.raises(GGUFFileError, match=r"'aa\.weight' \(Q8_0\).*multiple of the 32-element block"):
        load_transformer(path)
    big = {"ac.weight": ("Q8_0", np.zeros((64, 34), np.uint8))}
    path = patch_info(small_file(tmp_path, **big), b"aa.weight", dim0=64)  # now runs into the next tensor
    with pytest.raises(GGUFFileError, match=r"overlap"):
        load_transformer(path)


def test_not_a_gguf_despite_the_name(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFFileError, match=r"x\.gguf"):
        load_transformer(path)


def test_architecture_is_read_but_shapes_decide(tmp_path, state):
    from gguf_files import write_gguf as write

    path, _ = model_gguf(tmp_path / "m.gguf", state, "Q8_0")
    from krea2_lite.files.gguf_container import read_gguf

    assert read_gguf(path).architecture == "krea2"
    tensors = {k: (t.qtype, read_gguf(path).raw(k).numpy()) for k, t in read_gguf(path).tensors.items()}
    flux = write(tmp_path / "flux.gguf", {k: (q, a.reshape(a.shape[0], -1) if q != "F32" else a)
                                          for k, (q, a) in tensors.items()}, arch="flux")
    assert read_gguf(flux).architecture == "flux"
    assert load_transformer(flux, dtype=torch.float32).config == CFG
