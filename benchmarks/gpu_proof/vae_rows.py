"""The GPU proof's "vae" section: the VAE encoder of images in (img2img, inpainting,
outpainting), time and peak memory at 1024² and 2048², untiled and tiled (64-latent tiles, 16
overlap), beside the 1024² whole-image decode whose budget a tiled 2048² encode must stay within.
Random weights at the released shape (base_dim 96); the tiny preset uses base_dim 8 and 128² / 256².
"""

from __future__ import annotations

import time

import torch

CASES = (("encode", 1024, None), ("encode", 1024, 64), ("encode", 2048, None), ("encode", 2048, 64),
         ("decode", 1024, None))


def _models(ctx):
    from krea2_lite.model.vae import QwenImageVAEConfig, QwenImageVAEDecoder
    from krea2_lite.model.vae_encoder import QwenImageVAEEncoder

    config = QwenImageVAEConfig(base_dim=8, num_res_blocks=1) if ctx.tiny else QwenImageVAEConfig()
    torch.manual_seed(0)
    enc = QwenImageVAEEncoder(config, dtype=ctx.dtype).to(ctx.device).eval().requires_grad_(False)
    dec = QwenImageVAEDecoder(config, dtype=ctx.dtype).to(ctx.device).eval().requires_grad_(False)
    return enc, dec


def _measure(ctx, fn) -> tuple[float, float | None]:
    """(median ms of ctx.repeats after one warm-up, peak MiB above what was allocated before; None on CPU)."""
    cuda = ctx.device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(max(1, ctx.repeats)):
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
        del out
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return sorted(times)[len(times) // 2], peak


def vae_rows(ctx, rec, section) -> None:
    from benchmarks.gpu_proof.record import describe

    enc, dec = _models(ctx)
    scale = 8 if ctx.tiny else 1  # the tiny preset: 128² / 256² instead of 1024² / 2048²
    try:
        for kind, size, tile in CASES:
            side, tile = size // scale, tile and tile // scale
            overlap = tile // 4 if tile else None
            case = f"vae {kind} {side}² {f'tiled {tile}/{overlap}' if tile else 'untiled'}"
            if not section.fits(30 if size == 2048 else 10):
                rec.timing(case=case, system="krea2_lite", quant=str(ctx.dtype).replace("torch.", ""), ms=None,
                           ok=False, detail="not measured: " + section.why_not(30))
                continue
            try:
                with torch.no_grad():
                    if kind == "encode":
                        x = torch.rand(1, 3, side, side, device=ctx.device, dtype=ctx.dtype) * 2 - 1
                        ms, peak = _measure(ctx, lambda: enc.encode(x, tile=tile, tile_overlap=overlap))
                    else:
                        z = torch.randn(1, 16, side // 8, side // 8, device=ctx.device, dtype=ctx.dtype)
                        ms, peak = _measure(ctx, lambda: dec.decode(z))
                rec.timing(case=case, system="krea2_lite", quant=str(ctx.dtype).replace("torch.", ""), ms=ms,
                           peak_mib=peak, detail="" if peak is not None else "peak: CUDA only")
            except Exception as exc:  # noqa: BLE001 - out of memory at 2048² untiled must not end the run
                rec.timing(case=case, system="krea2_lite", quant=str(ctx.dtype).replace("torch.", ""), ms=None,
                           ok=False, detail=f"not measured: {describe(exc)}")
            finally:
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        del enc, dec
