"""Qwen-Image VAE encoder (krea2_lite.model.vae_encoder, loaded by krea2_lite.load_vae_encoder)
against diffusers' AutoencoderKLQwenImage.encode, on a tiny random VAE and on the demo VAE."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLQwenImage  # noqa: E402

import krea2_lite  # noqa: E402
from krea2_lite.demo import demo_path  # noqa: E402
from krea2_lite.errors import CheckpointKeysError, CheckpointNotFoundError, Krea2LiteError  # noqa: E402
from factories import tiny_vae  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _reference(vae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_vae_enc")
    vae = tiny_vae(1)
    vae.save_pretrained(root / "vae")
    return vae, root


def test_random_vae_parity_pipeline_folder_and_vae_folder(saved):
    vae, root = saved
    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = _reference(vae, x)
    for path in (root, root / "vae"):
        enc = krea2_lite.load_vae_encoder(path)
        out = enc.encode(x)
        assert out.shape == (2, 16, 6, 5)
        assert _rel(out, ref) <= 1e-5


def test_demo_vae_parity_and_keys():
    folder = demo_path() / "vae"
    keys = load_file(folder / WEIGHTS).keys()
    assert any(k.startswith("encoder.") for k in keys) and "quant_conv.weight" in keys
    vae = AutoencoderKLQwenImage.from_pretrained(folder).eval()
    enc = krea2_lite.load_vae_encoder(demo_path())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert _rel(enc.encode(x), _reference(vae, x)) <= 1e-5


def test_bf16(saved):
    vae, root = saved
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    half = krea2_lite.load_vae_encoder(root, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and _rel(half.encode(x).float(), _reference(vae, x)) <= 0.05


def _scene(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = torch.stack([xx, yy, xx * yy])[None]
    img[:, :, size // 4:size // 2, size // 3:3 * size // 4] = torch.tensor([0.8, -0.5, 0.2])[:, None, None]
    return img


def test_tiled_encode_is_close_and_seamless():
    enc = krea2_lite.load_vae_encoder(demo_path())
    img = _scene(256)
    full, tiled = enc.encode(img), enc.encode(img, tile=16, tile_overlap=4)
    assert tiled.shape == full.shape == (1, 16, 32, 32)
    # The mid block's attention is global, so tiles are approximate: measured 0.067 for this image.
    assert _rel(tiled, full) <= 0.12
    # Seams: the step between neighbouring latents (rows and columns) stays what the untiled encode
    # has (measured differences ≤ 0.08); an unblended tile edge shows up as an extra jump.
    for dim in (-1, -2):
        jump = lambda z: z.diff(dim=dim).abs().amax(dim=(0, 1, 2 if dim == -1 else 3))  # noqa: E731
        assert (jump(tiled) - jump(full)).abs().max().item() <= 0.15
    assert torch.equal(enc.encode(img, tile=64), full)  # a tile larger than the image: untiled, exactly


def test_auto_tiling_threshold(saved, monkeypatch):
    enc = krea2_lite.load_vae_encoder(saved[1])
    x = torch.rand(1, 3, 96, 64) * 2 - 1
    assert torch.equal(enc.encode(x, tile="auto"), enc.encode(x))
    monkeypatch.setattr(enc, "auto_tile_area", 50)
    monkeypatch.setattr(enc, "auto_tile", 6)
    assert torch.equal(enc.encode(x, tile="auto"), enc.encode(x, tile=6))


def test_bad_inputs(saved):
    enc = krea2_lite.load_vae_encoder(saved[1])
    for bad in (torch.zeros(1, 3, 20, 16), torch.zeros(3, 16, 16), torch.zeros(1, 4, 16, 16)):
        with pytest.raises(ValueError):
            enc.encode(bad)
    with pytest.raises(ValueError):
        enc.encode(torch.zeros(1, 3, 16, 16), tile=4, tile_overlap=4)


def test_decoder_only_vae_is_a_clear_error(saved, tmp_path):
    _, root = saved
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_bytes((root / "vae" / "config.json").read_bytes())
    tensors = load_file(root / "vae" / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if not k.startswith(("encoder.", "quant_conv."))},
              tmp_path / "vae" / WEIGHTS)
    with pytest.raises(CheckpointKeysError, match="no encoder weights"):
        krea2_lite.load_vae_encoder(tmp_path)
    from krea2_lite.loading.vae import load_vae_decoder

    load_vae_decoder(tmp_path)  # the decoder never needed them
    del tensors["encoder.conv_in.weight"]
    save_file(tensors, tmp_path / "vae" / WEIGHTS)
    with pytest.raises(CheckpointKeysError, match="encoder.conv_in.weight"):
        krea2_lite.load_vae_encoder(tmp_path)
    with pytest.raises(CheckpointNotFoundError):
        krea2_lite.load_vae_encoder(tmp_path / "nowhere")
    assert issubclass(CheckpointKeysError, Krea2LiteError)
