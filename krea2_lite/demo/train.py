"""Train the demo model: `python -m krea2_lite.demo.train --out DIR --seed 0`.

Stages, each seeded on its own and cached in `--work` (an interrupted run resumes):
  1. tokenizer: a byte-level BPE (Qwen's split rule and special tokens) on the captions and the
     Krea 2 prompt template, so each caption word is one token;
  2. text encoder: a tiny random Qwen3-VL (36 text layers of width 32, so the real taps
     (2, 5, …, 35) apply), never trained — the transformer's text fusion learns to read it;
  3. transformer: a tiny `Krea2Transformer` (width 128, 4 blocks, 1.1M parameters) trained with
     the flow-matching objective (x_t = (1−t)·x + t·noise, target v = noise − x, t logit-normal
     then shifted as the sampler shifts it), 10 % of captions dropped for CFG, EMA weights kept,
     on latents and text states computed once; in phases (default 3000 + 2400 + 2000 steps of
     32), each a fresh warm-up + cosine schedule starting from the previous phase's EMA weights
     (the phases are how the shipped model was trained: each was added when the previous one
     ended, while the loss was still falling);
  4. VAE: a tiny diffusers `AutoencoderKLQwenImage` (f8, 16 latent channels, base width 8) whose
     latent space is fixed by design (`design_latents`: a 16×16 colour thumbnail plus edge
     strength, packed into 16×8×8); its decoder is trained to reconstruct the images from those
     latents (with a little latent noise), then its encoder to reproduce them.
Stages 3 and 4 are independent (`--stage transformer` / `--stage vae` may run side by side);
`--stage all` (the default) runs both, then writes the diffusers-layout folder to a temporary
sibling of `--out` and renames it into place.

Training needs diffusers (a test-only dependency of krea2_lite) for the VAE's encoder and the
folder format; loading the result does not. Fixed step counts (not a time budget) keep a run
deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import dataset
from ..files.jsonfile import read_json

SEED_OFFSETS = {"tokenizer": 0, "text": 1, "vae": 2, "vae_data": 3, "data": 4, "transformer": 5}
VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        sys.exit("krea2_lite.demo.train needs diffusers (the VAE encoder and the folder format): "
                 "pip install 'diffusers==0.42.1' (or pip install -e '.[test]'). "
                 "Loading the trained demo does not need it.")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---- VAE -----------------------------------------------------------------------------------

class single_frame_convs:
    """Run diffusers' causal 3D convolutions as 2D ones while training on single frames.

    For one frame a causal 3D conv only meets data through its kernel's last temporal slice
    (the rest multiplies zero padding), so this is exact and ~3× cheaper; the unused slices get
    no gradient. krea2_lite's decoder reads the same last slice.
    """

    def __enter__(self):
        from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen

        self.cls, self.original = qwen.QwenImageCausalConv3d, qwen.QwenImageCausalConv3d.forward
        original = self.original

        def forward(conv, x, cache_x=None):
            if x.shape[2] == 1 and cache_x is None:
                pad = (conv._padding[2], conv._padding[0])
                return F.conv2d(x[:, :, 0], conv.weight[:, :, -1], conv.bias, conv.stride[1:], pad)[:, :, None]
            return original(conv, x, cache_x)

        self.cls.forward = forward
        return self

    def __exit__(self, *exc):
        self.cls.forward = self.original


def design_latents(pixels: torch.Tensor) -> torch.Tensor:
    """The demo VAE's latent space, fixed by design: (N, 3, 64, 64) in [-1, 1] → (N, 16, 8, 8).

    Channels 0–11: the 16×16 colour thumbnail (4×4 average pooling), its 2×2 sub-cells packed
    into channels (pixel-unshuffle); channels 12–15: the luminance standard deviation inside each
    4×4 cell (where the edges are), packed the same way. Learning an encoder and a decoder
    jointly from scratch is slow on a CPU (the Qwen-Image autoencoder's RMS-normed encoder took
    hundreds of steps to pass any colour information); with the latent space fixed, the decoder
    learns to draw crisp shapes from the thumbnail and the encoder learns to reproduce it, each
    a plain regression.
    """
    colour = F.avg_pool2d(pixels, 4)
    lum = pixels.mean(dim=1, keepdim=True)
    spread = (F.avg_pool2d(lum ** 2, 4) - F.avg_pool2d(lum, 4) ** 2).clamp(min=0).sqrt() * 4
    return torch.cat([F.pixel_unshuffle(colour, 2), F.pixel_unshuffle(spread, 2)], dim=1)


def train_vae(work: Path, seed: int, steps: int, encoder_steps: int, batch: int, lr: float):
    """Decoder (krea2_lite's 2D Qwen-Image decoder, same weights as diffusers') on design latents,
    then the diffusers encoder regressing them; returns the diffusers AutoencoderKLQwenImage."""
    from diffusers import AutoencoderKLQwenImage

    from ..model.vae import QwenImageVAEConfig, QwenImageVAEDecoder

    done = work / "vae"
    if (done / "config.json").is_file():
        log(f"VAE: reusing {done}")
        return AutoencoderKLQwenImage.from_pretrained(done).eval()
    images, _, _ = dataset.sample(max(steps, encoder_steps) * batch // 2, seed + SEED_OFFSETS["vae_data"])
    pixels = to_tensor(images)
    latents = design_latents(pixels)
    std = latents.std(dim=(0, 2, 3))
    torch.manual_seed(seed + SEED_OFFSETS["vae"])
    vae = AutoencoderKLQwenImage(**VAE_CONFIG)
    config = QwenImageVAEConfig.from_dict(dict(vae.config))
    decoder = QwenImageVAEDecoder(config)
    state = vae.state_dict()
    decoder.load_state_dict({k: state[k][:, :, -1] if state[k].ndim == 5 else state[k].reshape(v.shape)
                             for k, v in decoder.state_dict().items()})
    log(f"VAE: decoder {sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M parameters, {len(pixels)} images, "
        f"{steps} decoder + {encoder_steps} encoder steps of {batch}")
    g = torch.Generator().manual_seed(seed + SEED_OFFSETS["vae"])

    def schedule(opt, step, total):
        for group in opt.param_groups:  # warm up, then cosine to 5 %
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total)))

    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    start = time.time()
    decoder.train()
    for step in range(steps):
        schedule(opt, step, steps)
        idx = torch.randint(0, len(pixels), (batch,), generator=g)
        x = pixels[idx]
        # Noise on the latents: the transformer's samples are never exact, the decoder must not mind.
        z = latents[idx] + 0.1 * std[None, :, None, None] * torch.randn(latents[idx].shape, generator=g)
        rec = decoder.decoder(decoder.post_quant_conv(z))
        l1 = (rec - x).abs().mean()
        loss = l1 + (rec - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            psnr = 10 * math.log10(4 / max((rec.detach().clamp(-1, 1) - x).pow(2).mean().item(), 1e-10))
            eta = (time.time() - start) / (step + 1) * (steps - step - 1)
            log(f"VAE decoder step {step:5d}/{steps}  l1 {l1.item():.4f}  psnr {psnr:5.2f} dB  eta {eta / 60:4.1f} min")
    with torch.no_grad():
        for key, value in decoder.state_dict().items():
            target = state[key]
            if target.ndim == 5:  # causal 3D kernel: the frame's slice is the last; the others meet only padding
                target.zero_()
                target[:, :, -1] = value
            else:
                target.copy_(value.reshape(target.shape))

    encoder = [p for n, p in vae.named_parameters() if n.startswith(("encoder.", "quant_conv."))]
    opt = torch.optim.Adam(encoder, lr=lr)
    start = time.time()
    vae.train()
    with single_frame_convs():
        for step in range(encoder_steps):
            schedule(opt, step, encoder_steps)
            idx = torch.randint(0, len(pixels), (batch,), generator=g)
            mean = vae.quant_conv(vae.encoder(pixels[idx][:, :, None]))[:, :VAE_CONFIG["z_dim"], 0]
            loss = ((mean - latents[idx]) / std[None, :, None, None]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == encoder_steps - 1:
                eta = (time.time() - start) / (step + 1) * (encoder_steps - step - 1)
                log(f"VAE encoder step {step:5d}/{encoder_steps}  relative mse {loss.item():.4f}  eta {eta / 60:4.1f} min")
    vae.eval()
    vae.save_pretrained(done, safe_serialization=True)
    return vae


# ---- tokenizer and text encoder ----------------------------------------------------------

TEXT_LAYERS = 36  # the real tap layout (2, 5, …, 35) needs 35 decoder layers
TEXT_WIDTH = 32


def train_tokenizer(vocab_size: int = 512):
    """Byte-level BPE with Qwen's split rule and special tokens, trained on the prompt template
    and every caption, so each caption word is one token."""
    from ..model.text_encoder import (DEFAULT_PREFIX_TOKENS, DEFAULT_SUFFIX_TOKENS, PROMPT_TEMPLATE_PREFIX,
                                      PROMPT_TEMPLATE_SUFFIX)
    from .tokenizer import qwen_style_bpe, strip_chat_markers

    captions = sorted({s.caption(p) for s in dataset.all_scenes() for p in (True, False)})
    template = [strip_chat_markers(PROMPT_TEMPLATE_PREFIX), strip_chat_markers(PROMPT_TEMPLATE_SUFFIX)]
    tokenizer = qwen_style_bpe(template * 20 + captions, vocab_size)
    # The pipeline drops the reference's fixed 34 prefix tokens and appends 5 suffix tokens: the
    # template must tokenize to exactly that, as with Qwen's tokenizer.
    counts = (len(tokenizer(PROMPT_TEMPLATE_PREFIX).input_ids), len(tokenizer(PROMPT_TEMPLATE_SUFFIX).input_ids))
    if counts != (DEFAULT_PREFIX_TOKENS, DEFAULT_SUFFIX_TOKENS):
        raise RuntimeError(f"the demo tokenizer makes {counts} tokens of the template prefix / suffix, "
                           f"not ({DEFAULT_PREFIX_TOKENS}, {DEFAULT_SUFFIX_TOKENS})")
    return tokenizer


def text_encoder_config(vocab_size: int):
    """A tiny Qwen3-VL: 36 text layers of width 32 (the real depth, so the real taps apply) and a
    one-layer vision tower (never used; present so the folder is a complete Qwen3VLModel)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            initializer_range=0.1, rope_theta=5_000_000.0,
            rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            tie_word_embeddings=True,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        tie_word_embeddings=True,
    )


def build_text(work: Path, seed: int) -> Path:
    """tokenizer/ and text_encoder/ under work/text (random, frozen text model)."""
    from transformers import Qwen3VLModel

    root = work / "text"
    if (root / "text_encoder" / "config.json").is_file():
        return root
    tokenizer = train_tokenizer()
    torch.manual_seed(seed + SEED_OFFSETS["text"])
    model = Qwen3VLModel(text_encoder_config(len(tokenizer))).eval()
    tmp = Path(tempfile.mkdtemp(dir=work, prefix=".text."))
    tokenizer.save_pretrained(tmp / "tokenizer")
    model.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    os.replace(tmp, root)
    log(f"text: tokenizer of {len(tokenizer)} tokens, Qwen3-VL text model {TEXT_LAYERS}×{TEXT_WIDTH} (random, frozen)")
    return root


@torch.no_grad()
def encode_captions(text_root: Path, captions: list[str], batch: int = 256):
    """Compacted text states of each caption: (N, L, 12, 32) float32 padded with zeros, lengths (N,)."""
    from ..loading.text_encoder import load_text_encoder
    from ..sampling import compact_text

    encoder = load_text_encoder(text_root / "text_encoder", dtype=torch.float32)
    states, lengths = [], []
    for i in range(0, len(captions), batch):
        hidden, mask = encoder.encode(captions[i:i + batch], max_sequence_length=32)
        packed = compact_text(hidden, mask)
        states += list(packed.context)
        lengths += mask.sum(1).tolist()
    longest = max(lengths)
    out = torch.zeros(len(states), longest, *states[0].shape[1:])
    for i, s in enumerate(states):
        out[i, :s.shape[0]] = s[:longest]
    return out, torch.tensor(lengths)


# ---- transformer ---------------------------------------------------------------------------

def transformer_config():
    from ..config import Krea2Config

    return Krea2Config(features=128, tdim=64, txtdim=TEXT_WIDTH, heads=2, kvheads=1, multiplier=4, layers=4,
                       patch=2, channels=16, txtheads=2, txtkvheads=2, txtlayers=12, theta=1000.0)


def prepare_data(work: Path, text_root: Path, seed: int, count: int):
    """Normalised latents (N, 16, 8, 8), caption ids (N,), caption states and lengths, stats."""
    cache, captions_file = work / "data.safetensors", work / "captions.json"
    if cache.is_file() and captions_file.is_file():  # safetensors + JSON: caches are never unpickled
        return dict(load_file(cache), captions=read_json(captions_file, expect=list, what="caption cache"))
    images, captions, _ = dataset.sample(count, seed + SEED_OFFSETS["data"])
    log(f"data: {count} images drawn")
    latents = design_latents(to_tensor(images))
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3))
    latents = (latents - mean[None, :, None, None]) / std[None, :, None, None]
    unique = [""] + sorted(set(captions))  # id 0: the empty (unconditional) prompt
    index = {c: i for i, c in enumerate(unique)}
    log(f"data: encoding {len(unique)} captions")
    states, lengths = encode_captions(text_root, unique)
    data = dict(latents=latents, caption_ids=torch.tensor([index[c] for c in captions]), states=states,
                lengths=lengths, mean=mean, std=std, captions=unique)
    save_file({k: v.contiguous() for k, v in data.items() if k != "captions"}, cache)
    captions_file.write_text(json.dumps(unique))
    return data


def shifted_logit_normal(n: int, mu: float, g: torch.Generator) -> torch.Tensor:
    """t = sigmoid(N(0, 1)), then the sampler's shift e^mu / (e^mu + 1/t − 1)."""
    t = torch.sigmoid(torch.randn(n, generator=g))
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def shape_weights(latents: torch.Tensor, weight: float, patch: int) -> torch.Tensor:
    """Per-token loss weights (N, tokens, channels·patch²): 1 + `weight` on the latent cells far from
    the image's background (the quarter of cells farthest from the per-channel spatial median)."""
    from ..sampling import pack_latents

    background = latents.median(dim=-1, keepdim=True).values.median(dim=-2, keepdim=True).values
    dev = (latents - background).norm(dim=1)
    mask = (dev > dev.flatten(1).quantile(0.75, dim=1)[:, None, None]).float()[:, None].expand_as(latents)
    return pack_latents(1 + weight * mask, patch)


def train_transformer(work: Path, data: dict, seed: int, steps: int, batch: int, lr: float,
                      uncond_p: float = 0.1, ema_decay: float = 0.998, phase: int = 1, init: dict | None = None,
                      shape_weight: float = 0.0, warmup: int = 200, generator_seed: int | None = None):
    """One training phase (fresh AdamW, warm-up, cosine to 10 %); a later phase starts from the
    previous one's EMA weights. Returns the EMA model; each phase is cached in work/transformer[N].safetensors.

    `shape_weight` > 0 weights the loss toward the shape's latent cells (`shape_weights`): the shape
    covers a small part of the image, so an unweighted loss learns the background and the shape's
    place long before its colour (33 % colour agreement after phases 1-3, 92 % after a weighted phase)."""
    from ..model import Krea2Transformer
    from ..sampling import pack_latents, positions, resolution_mu

    done = work / ("transformer.safetensors" if phase == 1 else f"transformer{phase}.safetensors")
    cfg = transformer_config()
    if done.is_file():
        log(f"transformer: reusing {done}")
        model = Krea2Transformer(cfg)
        model.load_state_dict(load_file(done))
        return model.eval()
    torch.manual_seed(seed + SEED_OFFSETS["transformer"] + 100 * (phase - 1))
    model = Krea2Transformer(cfg)
    if init is not None:
        model.load_state_dict(init)
    ema = Krea2Transformer(cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    log(f"transformer phase {phase}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{steps} steps of {batch}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    if generator_seed is None:
        generator_seed = seed + SEED_OFFSETS["transformer"] + 100 * (phase - 1)
    g = torch.Generator().manual_seed(generator_seed)
    latents, ids, states, lengths = data["latents"], data["caption_ids"], data["states"], data["lengths"]
    weights = shape_weights(latents, shape_weight, cfg.patch) if shape_weight else None
    mu = resolution_mu((latents.shape[2] // 2) * (latents.shape[3] // 2))
    rows, cols = latents.shape[2] // 2, latents.shape[3] // 2
    start, running = time.time(), None
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / warmup)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        cid = torch.where(torch.rand(batch, generator=g) < uncond_p, 0, ids[idx])
        length = int(lengths[cid].max())
        context = states[cid, :length]
        mask = torch.arange(length)[None, :] < lengths[cid][:, None]
        x0 = pack_latents(latents[idx], cfg.patch)
        noise = torch.randn(x0.shape, generator=g)
        t = shifted_logit_normal(batch, mu, g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = model(xt, context, t, positions(length, rows, cols), None if bool(mask.all()) else mask)
        if weights is None:
            loss = F.mse_loss(v, noise - x0)
        else:
            w = weights[idx]
            loss = (w * (v - (noise - x0)) ** 2).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            eta = (time.time() - start) / (step + 1) * (steps - step - 1)
            log(f"transformer step {step:6d}/{steps}  loss {running:.4f}  eta {eta / 60:5.1f} min")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, done)
    return ema.eval()


# ---- the folder ------------------------------------------------------------------------------

DEMO_DEFAULTS = dict(steps=20, guidance=4.0, width=dataset.IMAGE_SIZE, height=dataset.IMAGE_SIZE)


def write_folder(out: Path, text_root: Path, vae, model, data: dict, defaults: dict, dtype=torch.float32):
    """A diffusers Krea2Pipeline folder (weights in `dtype`), plus the demo's sampling defaults in
    model_index.json under "krea2_lite"; written beside `out` and renamed into place."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3VLModel

    from ..files.checkpoint import diffusers_to_official_key, diffusers_transformer_kwargs

    cfg = model.config
    reference = Krea2Transformer2DModel(**diffusers_transformer_kwargs(cfg))
    ours = model.state_dict()
    theirs = {}
    for key, value in reference.state_dict().items():
        theirs[key] = ours[diffusers_to_official_key(key)].reshape(value.shape)
    reference.load_state_dict(theirs, strict=True)

    vae = vae.to(dtype)
    vae.register_to_config(latents_mean=data["mean"].tolist(), latents_std=data["std"].tolist())
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=6400, base_shift=0.5, max_shift=1.15,
                                                time_shift_type="exponential")
    pipe = Krea2Pipeline(scheduler=scheduler, vae=vae,
                         text_encoder=Qwen3VLModel.from_pretrained(text_root / "text_encoder", dtype=dtype),
                         tokenizer=AutoTokenizer.from_pretrained(text_root / "tokenizer"),
                         transformer=reference.to(dtype), is_distilled=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index = read_json(tmp / "model_index.json", what="model_index.json")
        index["krea2_lite"] = dict(defaults, description="krea2_lite demo: a miniature Krea 2 trained on "
                                   "procedural shapes (krea2_lite/demo/train.py)")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m krea2_lite.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="pipeline folder to write (replaced atomically)")
    parser.add_argument("--work", help="cache of finished stages (default: OUT + '.work')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-steps", type=int, default=2400, help="decoder steps")
    parser.add_argument("--vae-encoder-steps", type=int, default=400)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--images", type=int, default=10240, help="training images for the transformer")
    parser.add_argument("--steps", type=int, nargs="+", default=[3000, 2400, 2000],
                        help="transformer steps of each training phase")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--lr2", type=float, default=4e-4, help="peak learning rate of the later phases")
    parser.add_argument("--shape-steps", type=int, default=3000,
                        help="steps of the last phase, whose loss is weighted toward the shape (0: none)")
    parser.add_argument("--shape-weight", type=float, default=4.0, help="extra loss weight on the shape's cells")
    parser.add_argument("--shape-lr", type=float, default=3e-4)
    parser.add_argument("--stage", choices=["all", "vae", "transformer"], default="all",
                        help="vae / transformer: train only that stage into --work (the two are independent: "
                        "the latent space is fixed by design, so they may run side by side); all: both, then "
                        "write --out")
    args = parser.parse_args(argv)
    _require_diffusers()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.stage in ("all", "transformer"):
        text_root = build_text(work, args.seed)
        data = prepare_data(work, text_root, args.seed, args.images)
        log(f"data ready after {(time.time() - t0) / 60:.1f} min")
        model = None
        for phase, steps in enumerate(args.steps, start=1):
            model = train_transformer(work, data, args.seed, steps, args.batch, args.lr if phase == 1 else args.lr2,
                                      phase=phase, init=None if model is None else model.state_dict())
        if args.shape_steps:
            model = train_transformer(work, data, args.seed, args.shape_steps, args.batch, args.shape_lr,
                                      phase=len(args.steps) + 1, init=model.state_dict(),
                                      shape_weight=args.shape_weight, warmup=100, generator_seed=args.seed + 4242)
        log(f"transformer ready after {(time.time() - t0) / 60:.1f} min")
    if args.stage in ("all", "vae"):
        vae = train_vae(work, args.seed, args.vae_steps, args.vae_encoder_steps, args.vae_batch, args.vae_lr)
        log(f"VAE ready after {(time.time() - t0) / 60:.1f} min")
    if args.stage == "all":
        write_folder(out, text_root, vae, model, data, DEMO_DEFAULTS)
    log(f"done in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
