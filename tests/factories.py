"""Random tiny Krea 2 transformers for tests: the diffusers reference and official-key weights."""

from __future__ import annotations

import torch

from krea2_lite.model.text_encoder import PROMPT_TEMPLATE_PREFIX, PROMPT_TEMPLATE_SUFFIX

from krea2_lite import Krea2Config
from krea2_lite.files.checkpoint import diffusers_to_official_key, diffusers_transformer_kwargs


diffusers_kwargs = diffusers_transformer_kwargs  # Krea2Transformer2DModel's arguments for a shape


def diffusers_transformer(cfg: Krea2Config, seed: int = 0):
    """A diffusers Krea2Transformer2DModel of shape `cfg` with every parameter randomised.

    Zero-initialised tensors (norm scales, modulation tables) are perturbed too, so the test
    exercises the 1+scale convention and the per-block tables.
    """
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(seed)
    model = Krea2Transformer2DModel(**diffusers_kwargs(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def official_state_dict(diffusers_model) -> dict[str, torch.Tensor]:
    """The diffusers weights under the official krea-2 names and shapes."""
    out = {}
    for key, value in diffusers_model.state_dict().items():
        name = diffusers_to_official_key(key)
        if name.startswith("blocks.") and name.endswith(".mod.lin"):
            value = value.reshape(-1)
        out[name] = value.detach().clone().contiguous()
    return out


def positions(txt_len: int, rows: int, cols: int) -> torch.Tensor:
    """(txt_len + rows·cols, 3): text at the origin, image tokens at (0, row, col)."""
    pos = torch.zeros(txt_len + rows * cols, 3)
    pos[txt_len:, 1] = torch.arange(rows).repeat_interleave(cols).float()
    pos[txt_len:, 2] = torch.arange(cols).repeat(rows).float()
    return pos


def random_inputs(cfg: Krea2Config, batch: int, txt_len: int, rows: int, cols: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, rows * cols, cfg.in_channels, generator=g)
    context = torch.randn(batch, txt_len, cfg.txtlayers, cfg.txtdim, generator=g)
    t = torch.rand(batch, generator=g)
    return img, context, t, positions(txt_len, rows, cols)


# ---- text encoder ----------------------------------------------------------------------------

CAPTIONS = [
    "a red fox sitting in the snow",
    "a photo of a cat on a blue sofa",
    "a large mountain under a starry night sky",
    "two dogs playing with a yellow ball in the green park",
]
NUM_LAYERS = 36
VOCAB = 512


def train_tokenizer():
    """A byte-level BPE with Qwen's split rule and special tokens; the Krea 2 template prefix
    and suffix come to exactly 34 and 5 tokens, as with the real Qwen tokenizer."""
    from krea2_lite.demo.tokenizer import qwen_style_bpe, strip_chat_markers

    template = [strip_chat_markers(PROMPT_TEMPLATE_PREFIX), strip_chat_markers(PROMPT_TEMPLATE_SUFFIX)]
    tokenizer = qwen_style_bpe([*template, *CAPTIONS] * 3, VOCAB)
    assert len(tokenizer) <= VOCAB
    return tokenizer


def tiny_qwen3vl_config(tie_word_embeddings=True):
    """A tiny Qwen3-VL with the real 36 text layers (hidden 32) and a one-layer vision tower."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            initializer_range=0.1, rope_theta=5_000_000.0,
            rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            tie_word_embeddings=tie_word_embeddings,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        tie_word_embeddings=tie_word_embeddings,
    )


# ---- VAE and whole pipeline ----------------------------------------------------------------

def tiny_vae(seed: int = 0, z_dim: int = 16):
    """A tiny random diffusers AutoencoderKLQwenImage with non-trivial norms, biases and stats."""
    from diffusers import AutoencoderKLQwenImage

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the default init draws from the global RNG: pin it
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(
            base_dim=16, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
            temperal_downsample=[False, True, True],  # two upsample3d blocks with (unused) time_conv weights
            latents_mean=torch.randn(z_dim, generator=g).tolist(),
            latents_std=(torch.rand(z_dim, generator=g) + 0.5).tolist())
    with torch.no_grad():  # gammas start at 1 and biases at 0: make them non-trivial
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return vae.eval()


def official_scheduler():
    """diffusers' flow-matching scheduler carrying the official Krea 2 shift values."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=6400, base_shift=0.5, max_shift=1.15,
                                           time_shift_type="exponential")


PIPELINE_CONFIG = Krea2Config.tiny(txtdim=32, txtheads=2, txtkvheads=1, txtlayers=12, channels=16)


def tiny_diffusers_pipeline(is_distilled: bool = False, seed: int = 0, transformer_config: Krea2Config | None = None):
    """A complete random diffusers Krea2Pipeline (tiny Qwen3-VL, VAE and transformer).

    `transformer_config` replaces PIPELINE_CONFIG (keep txtdim / txtlayers / channels as there)."""
    from diffusers import Krea2Pipeline
    from transformers import Qwen3VLModel

    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    text_encoder = Qwen3VLModel(tiny_qwen3vl_config()).eval()
    return Krea2Pipeline(scheduler=official_scheduler(), vae=tiny_vae(seed), text_encoder=text_encoder,
                         tokenizer=tokenizer, transformer=diffusers_transformer(transformer_config or PIPELINE_CONFIG, seed=seed),
                         is_distilled=is_distilled)


def qwen3vl_hub_folder(folder):
    """A hub-layout Qwen3-VL folder (model.language_model.* plus model.visual.*, lm_head, the norm and
    the last layer) with the tiny config and the test tokenizer; returns `folder`."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(tiny_qwen3vl_config(tie_word_embeddings=False)).eval().save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)
    return folder


def assert_free_space_estimate(folder, spec, config) -> None:
    """The quantize CLI's free-space estimate for `folder` (written with `spec` from a `config`
    checkpoint): its exact part equals the tensor bytes written (up to quanto's two 4-byte activation
    scales per quantized layer), and the whole estimate covers the transformer folder."""
    import json
    import struct

    import torch

    from krea2_lite.offload.sizes import transformer_weights
    from krea2_lite.cli.quantize import estimate_bytes
    from krea2_lite.files.quantized_folder import folder_size, read_manifest

    data = 0
    for file in (folder / "transformer").glob("*.safetensors"):
        with open(file, "rb") as handle:
            header = struct.unpack("<Q", handle.read(8))[0]
            json.loads(handle.read(header))
        data += file.stat().st_size - 8 - header
    exact = transformer_weights(config, spec, torch.bfloat16).total
    layers = len(read_manifest(folder)["quant"]["modules"])
    assert exact <= data <= exact + 8 * layers, (exact, data)
    assert folder_size(folder / "transformer") <= estimate_bytes(config, spec)
