"""Time one transformer step (a full forward) of krea2_lite beside diffusers' Krea2Transformer2DModel.

Both models share the same random weights at the chosen shape (`--preset full` = the released
12.9B shape; random weights cost exactly what real ones do). Cases:
  * "padded 512": what diffusers' pipeline feeds — 512 text tokens, most of them padding, masked;
  * "compact": what krea2_lite's pipeline feeds — only the real text tokens, no mask.
Each case runs krea2_lite with KREA2_LITE_KERNELS=torch (SDPA) and =triton (fused attention, GPU
only) and diffusers, alternating, medians over repeats after warm-up. Prints a Markdown table
naming the device; --json writes the rows.

  python -m benchmarks.transformer_step --device cuda --preset full --resolution 1024
  python -m benchmarks.transformer_step --device cpu --preset tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path


import torch

from benchmarks.common import PRESETS, alternate, device_name, markdown_table, write_json
from krea2_lite import Krea2Config, Krea2Transformer
from krea2_lite.sampling import positions



def build_models(cfg: Krea2Config, device: torch.device, dtype: torch.dtype, with_peer: bool):
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = Krea2Transformer(cfg)
    for name, p in list(ours.named_parameters()):  # random N(0, 0.02), the loader's dtype policy
        target = torch.float32 if name.endswith(".scale") or name.endswith(".lin") else dtype
        parent, _, leaf = name.rpartition(".")
        value = torch.empty(p.shape, device=device, dtype=target).normal_(0.0, 0.02)
        ours.get_submodule(parent)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    ours.eval()
    peer = None
    if with_peer:
        from diffusers import Krea2Transformer2DModel
        from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

        from krea2_lite.files.checkpoint import diffusers_transformer_kwargs

        with torch.device("meta"):
            peer = Krea2Transformer2DModel(**diffusers_transformer_kwargs(cfg))
        shared = convert_krea2_transformer_checkpoint_to_diffusers(dict(ours.state_dict()))
        # Views of krea2_lite's tensors (no second copy); only the small modulation tables are
        # cast, because diffusers keeps them in the model dtype.
        shared = {k: (v.to(dtype) if "scale_shift_table" in k else v) for k, v in shared.items()}
        peer.load_state_dict(shared, assign=True)
        peer.eval()
    return ours, peer


def make_inputs(cfg, device, dtype, resolution, txt_len, real_tokens, batch):
    g = torch.Generator(device="cpu").manual_seed(1)
    side = resolution // 16
    img = torch.randn(batch, side * side, cfg.in_channels, generator=g).to(device, dtype)
    ctx = torch.randn(batch, txt_len, cfg.txtlayers, cfg.txtdim, generator=g).to(device, dtype)
    t = torch.full((batch,), 0.5, device=device, dtype=dtype)
    pos = positions(txt_len, side, side, device=device)
    text_mask = None
    if real_tokens < txt_len:
        text_mask = torch.zeros(batch, txt_len, dtype=torch.bool, device=device)
        text_mask[:, :real_tokens] = True
    return img, ctx, t, pos, text_mask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes; 2 = a CFG step")
    ap.add_argument("--real-tokens", type=int, default=64, help="real prompt tokens (incl. the template suffix)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true", help="skip diffusers")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: needs CUDA")
        return 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = PRESETS[args.preset]
    with_peer = not args.no_peer
    if with_peer:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers not installed: peer rows skipped")
            with_peer = False
    ours, peer = build_models(cfg, device, dtype, with_peer)
    weights_gb = sum(p.numel() * p.element_size() for p in ours.parameters()) / 1e9
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    rows = []
    cases = [("padded 512", 512, args.real_tokens), ("compact", args.real_tokens, args.real_tokens)]
    for batch, (case, txt_len, real) in [(b, c) for b in args.batch for c in cases]:
        img, ctx, t, pos, text_mask = make_inputs(cfg, device, dtype, args.resolution, txt_len, real, batch)
        full_mask = None
        if text_mask is not None:
            full_mask = torch.cat([text_mask, text_mask.new_ones(batch, img.shape[1])], dim=1)
        systems = {}
        for backend in backends:
            def fn(backend=backend):
                os.environ["KREA2_LITE_KERNELS"] = backend
                ours(img, ctx, t, pos, full_mask)
            systems[f"krea2_lite ({backend})"] = fn
        if peer is not None:
            systems["diffusers"] = lambda: peer(img, ctx, t, pos, encoder_attention_mask=text_mask, return_dict=False)
        peaks = {}
        with torch.no_grad():
            for name, fn in systems.items():
                for _ in range(args.warmup):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    fn()
                    peaks[name] = torch.cuda.max_memory_allocated() / 1e9
            times = alternate(systems, device, args.repeats)  # systems alternate within each repeat
        base = statistics.median(times["krea2_lite (torch)"])
        ref = statistics.median(times["diffusers"]) if "diffusers" in times else None
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(system=name.split(" ")[0], backend=name, case=case, device=device_name(device),
                             preset=args.preset, dtype=str(dtype).replace("torch.", ""),
                             resolution=args.resolution, batch=batch, text_tokens=txt_len,
                             median_ms=round(med, 2), min_ms=round(min(ts), 2),
                             vs_diffusers=round(med / ref, 3) if ref else None,
                             vs_krea2_lite_torch=round(med / base, 3),
                             peak_gb=round(peaks[name], 2) if name in peaks else None))
    print(f"\n{device_name(device)} · preset {args.preset} ({weights_gb:.1f} GB weights) · {dtype} · "
          f"{args.resolution}² · medians of {args.repeats}\n")
    print(markdown_table(["batch", "case", "system", "text tokens", "median ms", "vs diffusers", "peak GB"],
                         [[r["batch"], r["case"], r["backend"], r["text_tokens"], r["median_ms"],
                           r["vs_diffusers"] if r["vs_diffusers"] is not None else "–",
                           r["peak_gb"] if r["peak_gb"] is not None else "–"] for r in rows],
                         align="rllrrrr"))
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
