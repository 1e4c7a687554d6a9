"""Random diffusers Krea2Pipeline folders at benchmark presets, written with `save_pretrained`.

Both systems under benchmark (krea2_lite's Krea2Pipeline and diffusers' Krea2Pipeline) load the
SAME folder, so they read the same files. Random weights cost exactly what trained ones cost.

Presets (transformer · text encoder · VAE · on-disk dtype):

  tiny    benchmarks/builders.py `tiny_diffusers_pipeline()`: Krea2Config.tiny(txtdim 32, txtlayers 12,
          channels 16) · tiny Qwen3-VL (36 layers, hidden 32) · tiny Qwen-Image VAE (base_dim 16,
          one res block) · float32. A few MB; for tests and plumbing, not for conclusions.
  medium  Krea2Config.medium() (features 768, 4 blocks, 6 heads / 2 kv, txtdim 256, txtlayers 12,
          ~43M parameters) · Qwen3-VL text path with hidden 256, 36 layers, 4 heads / 2 kv,
          head_dim 64, intermediate 1024, mRoPE sections [12, 10, 10] (the real ones halved), and a
          one-layer vision tower (diffusers loads it, krea2_lite never reads it) · the REAL
          Qwen-Image VAE shape (base_dim 96, dim_mult 1-2-4-4, 2 res blocks: decode cost is the
          released one) · float32.
  full    Krea2Config.krea2() (the released 12.9B shape) · Qwen3-VL-4B (text: hidden 2560, 36
          layers, 32 heads / 8 kv, head_dim 128, intermediate 9728, mRoPE [24, 20, 20] interleaved,
          theta 5e6; vision: depth 24, hidden 1024, out 2560, deepstack 5/11/17) · the real VAE
          config · bfloat16 (the released dtype), ~34 GB on disk (4.05B text encoder incl. its 0.4B vision
          tower: the real 4.44B less the 151936-row embedding). Meant for a GPU machine: on a
          machine without CUDA it is refused.

Vocabulary: every preset uses the small byte-level BPE trained by benchmarks/builders.py
(`train_tokenizer`, ≤ 512 tokens) and an embedding table of that size instead of Qwen's 151936
rows. The table is only gathered from (one row per token), so its size changes load time and
memory by ~0.8 GB bf16 at the full width and compute not at all.

Folders are cached under --workdir (default: $KREA2_BENCH_DIR or <tmp>/krea2_lite_bench) as
`<preset>-v<FACTORY_VERSION>`, written under a temporary name and renamed when complete.

  python -m benchmarks.pipeline_factory --preset medium            # prints the folder
  python -m benchmarks.pipeline_factory --preset tiny --out /tmp/tiny_pipe --force
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.builders import PIPELINE_CONFIG, VOCAB, official_scheduler, tiny_diffusers_pipeline, \
    tiny_qwen3vl_config, train_tokenizer
from benchmarks.common import PRESETS
from krea2_lite import Krea2Config
from krea2_lite.files.checkpoint import diffusers_transformer_kwargs

FACTORY_VERSION = 1
STAMP = "bench_factory.json"


class PresetUnavailable(RuntimeError):
    """The preset cannot be built or run on this machine (the message says why)."""


def check_preset(preset: str, device: str | torch.device) -> None:
    """Refuse `full` where it cannot sensibly run."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if preset == "full" and (torch.device(device).type != "cuda" or not torch.cuda.is_available()):
        raise PresetUnavailable(
            "preset 'full' is the released shape (12.8B transformer + Qwen3-VL-4B, ~34 GB of bf16 "
            "weights per system, two systems) and is meant for a GPU machine: run it with --device cuda "
            "where CUDA is available. On the CPU use --preset medium (or tiny).")


def usable_device(device: str, preset: str) -> tuple[torch.device | None, int]:
    """(device, 0) when the run can go ahead; (None, exit status) after saying why it cannot:
    0 for a CUDA run on a machine without CUDA (skipped), 2 for a preset refused here."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("skipped: needs CUDA")
        return None, 0
    try:
        check_preset(preset, dev)
    except PresetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 2
    return dev, 0


def transformer_config(preset: str) -> Krea2Config:
    if preset == "tiny":
        return PIPELINE_CONFIG
    if preset == "medium":
        return Krea2Config.medium(txtdim=256, txtlayers=12)
    return Krea2Config.krea2()


def qwen3vl_config(preset: str):
    from transformers import Qwen3VLConfig

    if preset == "tiny":
        return tiny_qwen3vl_config()
    if preset == "medium":
        text = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=36,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
                    max_position_embeddings=4096, rope_theta=5_000_000.0,
                    rope_scaling={"rope_type": "default", "mrope_section": [12, 10, 10], "mrope_interleaved": True},
                    tie_word_embeddings=True)
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=256,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                      deepstack_visual_indexes=[0])
    else:  # Qwen/Qwen3-VL-4B-Instruct's config.json, except the vocabulary (see the module docstring)
        text = dict(vocab_size=VOCAB, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                    max_position_embeddings=262144, rope_theta=5_000_000.0,
                    rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                    tie_word_embeddings=True)
        vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


def _randomize_(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int,
                std: float = 0.02) -> None:
    """Give every parameter (meta or not) a random value on the CPU in `dtype`.

    Matrices and biases: N(0, std). 1-D weights of norms: 1 + N(0, std). Values are drawn on
    `device` (CUDA is much faster for 13B numbers) and moved to the CPU for saving.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(module.named_parameters()):
        value = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)
        leaf_owner, _, leaf = name.rpartition(".")
        if p.ndim == 1 and leaf == "weight" and "norm" in name.lower():
            value += 1.0
        owner = module.get_submodule(leaf_owner) if leaf_owner else module
        owner._parameters[leaf] = torch.nn.Parameter(value.to("cpu"), requires_grad=False)
        del value
    for name, b in list(module.named_buffers()):  # persistent buffers of a meta build
        if b.is_meta:
            leaf_owner, _, leaf = name.rpartition(".")
            owner = module.get_submodule(leaf_owner) if leaf_owner else module
            owner._buffers[leaf] = torch.zeros(b.shape, dtype=b.dtype if b.dtype != torch.float32 else dtype)


def _diffusers_transformer(cfg: Krea2Config, device: torch.device, dtype: torch.dtype, seed: int):
    from diffusers import Krea2Transformer2DModel

    with torch.device("meta"):
        model = Krea2Transformer2DModel(**diffusers_transformer_kwargs(cfg))
    _randomize_(model, device, dtype, seed)
    return model.eval()


def _text_encoder(preset: str, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen3VLModel

    with torch.device("meta"):
        model = Qwen3VLModel(qwen3vl_config(preset))
    _randomize_(model, device, dtype, seed + 1)
    return model.eval()


def _real_vae(dtype: torch.dtype, seed: int):
    """diffusers AutoencoderKLQwenImage with its default (= Qwen-Image's) config, random weights."""
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # gammas start at 1 and biases at 0: make them non-trivial
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()


def build_pipeline(preset: str, seed: int = 0, device: str | torch.device | None = None):
    """The diffusers Krea2Pipeline object of `preset` (Raw: is_distilled False), weights on the CPU."""
    from diffusers import Krea2Pipeline

    if preset == "tiny":
        return tiny_diffusers_pipeline(seed=seed)
    build_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if preset == "medium" else torch.bfloat16
    torch.manual_seed(seed)
    transformer = _diffusers_transformer(transformer_config(preset), build_device, dtype, seed)
    text_encoder = _text_encoder(preset, build_device, dtype, seed)
    return Krea2Pipeline(scheduler=official_scheduler(), vae=_real_vae(dtype, seed), text_encoder=text_encoder,
                         tokenizer=train_tokenizer(), transformer=transformer, is_distilled=False)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_preset(preset: str, out: Path, *, seed: int = 0, force: bool = False) -> Path:
    """Build `preset` and save_pretrained it into `out` (atomically: temp name, then rename)."""
    out = Path(out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists; pass force=True / --force to rebuild it")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        started = time.perf_counter()
        pipe = build_pipeline(preset, seed)
        pipe.save_pretrained(tmp, safe_serialization=True)
        del pipe
        (tmp / STAMP).write_text(json.dumps({"preset": preset, "factory_version": FACTORY_VERSION, "seed": seed,
                                             "build_s": round(time.perf_counter() - started, 1)}, indent=1))
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same folder first: keep theirs
            if not (out / STAMP).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_workdir() -> Path:
    return Path(os.environ.get("KREA2_BENCH_DIR") or Path(tempfile.gettempdir()) / "krea2_lite_bench")


def ensure_preset(preset: str, workdir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The cached folder of `preset` under `workdir`, built first when missing."""
    out = Path(workdir or default_workdir()) / f"{preset}-v{FACTORY_VERSION}-seed{seed}"
    stamp = out / STAMP
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("preset") == preset and info.get("factory_version") == FACTORY_VERSION:
            return out
    return save_preset(preset, out, seed=seed, force=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), required=True)
    ap.add_argument("--out", type=Path, help="folder to write (default: the cached folder under --workdir)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = ap.parse_args()
    try:
        check_preset(args.preset, "cuda" if torch.cuda.is_available() else "cpu")
    except PresetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        path = save_preset(args.preset, args.out, seed=args.seed, force=args.force)
    elif args.force:
        path = save_preset(args.preset, Path(args.workdir or default_workdir())
                           / f"{args.preset}-v{FACTORY_VERSION}-seed{args.seed}", seed=args.seed, force=True)
    else:
        path = ensure_preset(args.preset, args.workdir, args.seed)
    print(f"{path} ({folder_size(path) / 1e9:.3f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
