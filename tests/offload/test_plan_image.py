"""The planner's "image" phase (images in): the VAE encoder counted like a component, tiled so that
a 2048² input fits the budget of a 1024² decode."""

import torch

from krea2_lite.config import Krea2Config
from krea2_lite.offload import plan_memory
from krea2_lite.offload import sizes


def test_image_phase_only_for_image_calls_and_counts_the_encoder():
    cfg = Krea2Config.krea2()
    enc = sizes.vae_encoder_weight_bytes(torch.bfloat16)
    assert 19e6 * 2 < enc < 20e6 * 2  # the Qwen-Image encoder's 2D path: 19.3M parameters
    common = dict(mode="sequential", host_ram_gb=1000, dtype=torch.bfloat16)
    plain = plan_memory(cfg, "int8", 12, 1024, 1024, **common)
    assert "image" not in plain.phases
    with_image = plan_memory(cfg, "int8", 12, 1024, 1024, image_encoder_bytes=enc, **common)
    assert with_image.phases["image"] >= with_image.phases["decode"] - with_image.parts["vae_activations"] + enc
    assert with_image.host_phases["image"] == with_image.host_phases["decode"] + enc


def test_tiled_encode_of_2048_fits_a_1024_decode():
    base = 96
    decode_1024 = sizes.vae_activation_bytes(base, 1024, 1024, 1, torch.bfloat16, None)
    encode_2048_tiled = sizes.vae_encoder_activation_bytes(base, 2048, 2048, 1, torch.bfloat16, 512)
    encode_2048_whole = sizes.vae_encoder_activation_bytes(base, 2048, 2048, 1, torch.bfloat16, None)
    assert encode_2048_tiled < decode_1024 < encode_2048_whole
    cfg = Krea2Config.krea2()
    enc = sizes.vae_encoder_weight_bytes(torch.bfloat16)
    big = plan_memory(cfg, "int8", 12, 2048, 2048, mode="sequential", host_ram_gb=1000, image_encoder_bytes=enc)
    assert big.vae_tile is not None
    assert big.parts["vae_activations"] >= encode_2048_tiled
