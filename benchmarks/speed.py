"""End-to-end pipeline speed of krea2_lite's Krea2Pipeline beside diffusers' Krea2Pipeline.

Both systems load the SAME saved folder (benchmarks/pipeline_factory.py: random weights at the
preset's shapes), get the same prompt ("a red fox sitting in the snow"), the same empty negative
prompt, the same initial noise (`Krea2Pipeline.noise(1, H, W, seed=0)`; diffusers receives it
packed with `krea2_lite.sampling.pack_latents`), the same steps and guidance (Raw: CFG on when
--guidance > 0, default 3.5; mu from the resolution), max_sequence_length 512 (both defaults).

What each figure is. Every repeat calls each pipeline ONCE, end to end (`pipe(prompt, ...)`, PIL
output), with its component calls wrapped by timers, so the stage times are parts of that very
call (on CUDA every timer synchronizes before it starts and before it stops):
  encode_ms    krea2_lite: `pipe.text_encoder.encode(prompts + negatives)` — one batched call,
               tokenization included. diffusers: `pipe.encode_prompt(...)`, summed over its two
               calls (prompt, then negative prompt), tokenization included.
  denoise_ms   krea2_lite: `krea2_lite.sampling.denoise(...)` (the Euler loop; text compaction and
               the schedule are computed just before it, so they fall in "other"). diffusers: the
               `with self.progress_bar(...)` block of `__call__` (its whole denoising loop).
  step_ms      denoise_ms / steps (with CFG, krea2_lite runs one batch-2 forward per step over the
               real text tokens; diffusers two batch-1 forwards over 512 padded, masked tokens).
  decode_ms    `pipe.vae.decode(...)` (krea2_lite's includes un-normalising the latents; diffusers
               does that with two elementwise ops just before the call). krea2_lite uses its
               default tile="auto" (untiled up to 1024², as diffusers).
  end_to_end_ms  the whole `pipe(...)` call, PIL images out.
  other_ms     end_to_end − encode − denoise − decode of the same call, then the median (argument
               checks, latent preparation, schedule, text compaction, PIL conversion). Medians of
               the stages need not add up to the median end-to-end.
  load_s       `from_pretrained` + moving to the device, ONE sample per system (page cache warm:
               the folder was just written or read), not a median.
Systems alternate within each repeat (--order alternate, the default; --order sequential loads
and measures one pipeline at a time, for a card that cannot hold both at the full shape); medians
over --repeats after --warmup untimed calls each.
max_pixel_diff: largest |difference| (0–255) between a peer's image and krea2_lite's of the first timed
repeat (krea2_lite's row: against the diffusers row), a sanity check that both did the same work;
quantized rows differ more.

Dtypes: CPU runs in float32, CUDA in bfloat16 (krea2_lite keeps its VAE in float32 on the CPU).
--quant (any string `krea2_lite.QuantSpec.parse` accepts: int8, fp8, int4, int8-w8a8, ...) quantizes
krea2_lite's transformer while loading (`from_pretrained(..., quant=)`). The peer is then what a
diffusers user does at that precision: the diffusers transformer loaded with
`quantization_config=QuantoConfig(weights_dtype=...)` (optimum-quanto, diffusers' defaults: every
linear quantized), its row labelled e.g. `int8 (quanto)`. quanto through diffusers is weight-only, so
a W8A8 mode is compared with quanto's weight-only peer of the same weight type (labelled "weights
only"). When torchao is importable, a third row `diffusers+torchao` loads the transformer with
`TorchAoConfig(<dtype> weight-only config)`; where torchao cannot run that type on the device, the
row is left out and the reason printed. Every system runs under `torch.no_grad()`, never
`torch.inference_mode()`: optimum-quanto's int4 fails there ("Cannot set version_counter for
inference tensor"). --offload / --vram-gb are passed to krea2_lite's from_pretrained (diffusers
always runs fully resident here).

Minimums: the rows also carry min_step_ms / min_end_to_end_ms (the fastest repeat) and ratios of
those (min_step_vs_peer, min_end_to_end_vs_peer). On a shared or noisy CPU, alternate the systems
and compare minimums over many repeats.

CUDA memory (per stage, last timed repeat): peak_alloc_gb = `torch.cuda.max_memory_allocated()`
during the stage (peak reset at its start) MINUS the other system's resident weights (both
pipelines live in one process when alternating), so it approximates the system alone;
reserved_gb = `torch.cuda.memory_reserved()` after the stage: the allocator's total, shared by
both systems. benchmarks/vram.py measures each system in a fresh process instead.

  python -m benchmarks.speed --device cpu --preset tiny --json /tmp/speed_tiny.json
  python -m benchmarks.speed --device cpu --preset medium --resolution 256 --steps 2
  python -m benchmarks.speed --device cuda --preset full --resolution 1024 --steps 8 --json full.json
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, markdown_table, model_dtype, write_json
from benchmarks.pipeline_factory import ensure_preset, usable_device
from benchmarks.systems import (SEED, STAGES, Ours, System, add_common_args, check_common_args, load_system,
                                max_pixel_diff, peer_classes, peer_note, prewarm_quant, quiet_libraries)


# ---- output ----------------------------------------------------------------------------------
def print_table(rows: list[dict], header: str) -> None:
    def ratio(v):
        return f"{v:.2f}×" if v is not None else "–"

    print(f"\n{header}\n")
    print(markdown_table(
        ["system", "weights", "load s", "encode ms", "step ms", "decode ms", "other ms", "end-to-end ms",
         "min step ms", "min end-to-end ms", "step vs diffusers", "end-to-end vs diffusers",
         "min step vs diffusers", "min end-to-end vs diffusers", "max Δpixel"],
        [[r["system"], r["weights"], f"{r['load_s']:.2f}", f"{r['encode_ms']:.1f}", f"{r['step_ms']:.1f}",
          f"{r['decode_ms']:.1f}", f"{r['other_ms']:.1f}", f"{r['end_to_end_ms']:.1f}", f"{r['min_step_ms']:.1f}",
          f"{r['min_end_to_end_ms']:.1f}", ratio(r["step_vs_diffusers"]), ratio(r["end_to_end_vs_diffusers"]),
          ratio(r["min_step_vs_peer"]), ratio(r["min_end_to_end_vs_peer"]),
          r["max_pixel_diff"] if r["max_pixel_diff"] is not None else "–"] for r in rows],
        align="ll" + "r" * 13))
    if any("peak_alloc_gb" in r for r in rows):
        print()
        print(markdown_table(
            ["system", "resident GB", "peak GB encode", "peak GB denoise", "peak GB decode", "reserved GB after decode"],
            [[r["system"], f"{r['resident_gb']:.2f}", *(f"{r['peak_alloc_gb'][k]:.2f}" for k in STAGES),
              f"{r['reserved_gb']['decode']:.2f}"] for r in rows]))


def write_chart(rows: list[dict], path: Path, title: str) -> None:
    """Stacked bars of the median stage times; silently skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [f"{r['system']}\n{r['weights']}" for r in rows]
    left = [0.0] * len(rows)
    for stage in ("encode", "denoise", "decode", "other"):
        widths = [r[f"{stage}_ms"] / 1e3 for r in rows]
        ax.barh(labels, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("seconds (median, end to end)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------
def measure(args, device: torch.device, folder: Path, notes: list[str]):
    """Load and time every system: (systems, {name: {stage: [ms per repeat]}}, {name: first images})."""
    common = dict(folder=folder, device=device, quant=args.quant, steps=args.steps, guidance=args.guidance,
                  resolution=args.resolution, max_sequence_length=args.max_sequence_length)
    ours_only = dict(offload=args.offload, vram_gb=args.vram_gb)
    classes = [Ours, *peer_classes(args.quant)]
    times, first_images = {}, {}

    def timed_run(s: System, rep: int, latents: torch.Tensor) -> None:
        images, t = s.run(latents)
        t["other"] = t["end_to_end"] - sum(t.get(k, 0.0) for k in STAGES)  # per call, then the median
        for k in (*STAGES, "other", "end_to_end"):
            times.setdefault(s.name, {}).setdefault(k, []).append(t.get(k, 0.0))
        if rep == 0:
            first_images[s.name] = images
        del images
        gc.collect()

    with torch.no_grad():  # never inference_mode: optimum-quanto's int4 fails under it
        if args.order == "alternate":  # every pipeline loaded; systems alternate within each repeat
            loaded = [load_system(cls, notes, **common, **(ours_only if cls is Ours else {})) for cls in classes]
            systems = [s for s in loaded if s is not None]
            latents = systems[0].pipe.noise(1, args.resolution, args.resolution, seed=SEED)
            for s in systems:
                for _ in range(args.warmup):
                    s.run(latents)
            for rep in range(args.repeats):
                for s in systems:
                    timed_run(s, rep, latents)
            return systems, times, first_images
        systems = []  # one pipeline at a time (the pair may not fit on the card together)
        for cls in classes:
            s = load_system(cls, notes, **common, **(ours_only if cls is Ours else {}))
            if s is None:
                continue
            if cls is Ours:
                latents = s.pipe.noise(1, args.resolution, args.resolution, seed=SEED)
            for _ in range(args.warmup):
                s.run(latents)
            for rep in range(args.repeats):
                timed_run(s, rep, latents)
            s.pipe = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            systems.append(s)
    return systems, times, first_images


def make_rows(args, device: torch.device, systems: list, times: dict, first_images: dict) -> list[dict]:
    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in times.items()}
    low = {name: {k: min(v) for k, v in d.items()} for name, d in times.items()}
    ref, ref_low = med["diffusers"], low["diffusers"]
    rows = []
    for s in systems:
        m, lo = med[s.name], low[s.name]
        row = dict(system=s.name, device=device_name(device), preset=args.preset, quant=args.quant,
                   offload=args.offload, resolution=args.resolution, steps=args.steps, guidance=args.guidance,
                   max_sequence_length=args.max_sequence_length, weights=s.weights,
                   kernels=os.environ.get("KREA2_LITE_KERNELS", "auto") if s.name == "krea2_lite" else None,
                   repeats=args.repeats, warmup=args.warmup, order=args.order, load_s=round(s.load_s, 3),
                   encode_ms=round(m["encode"], 2), denoise_ms=round(m["denoise"], 2),
                   step_ms=round(m["denoise"] / args.steps, 2), decode_ms=round(m["decode"], 2),
                   other_ms=round(m["other"], 2), end_to_end_ms=round(m["end_to_end"], 2),
                   min_step_ms=round(lo["denoise"] / args.steps, 2),
                   min_end_to_end_ms=round(lo["end_to_end"], 2),
                   step_vs_diffusers=round(m["denoise"] / ref["denoise"], 3),
                   end_to_end_vs_diffusers=round(m["end_to_end"] / ref["end_to_end"], 3),
                   min_step_vs_peer=round(lo["denoise"] / ref_low["denoise"], 3),
                   min_end_to_end_vs_peer=round(lo["end_to_end"] / ref_low["end_to_end"], 3),
                   max_pixel_diff=max_pixel_diff(first_images["krea2_lite"],
                                                  first_images["diffusers" if s.name == "krea2_lite" else s.name]),
                   date=time.strftime("%Y-%m-%d"), torch=torch.__version__)
        if device.type == "cuda":
            others = sum(o.resident_bytes for o in systems if o is not s) if args.order == "alternate" else 0
            row["resident_gb"] = round(s.resident_bytes / 1e9, 3)
            row["peak_alloc_gb"] = {k: round((s.clock.peaks.get(k, 0) - others) / 1e9, 3) for k in STAGES}
            row["reserved_gb"] = {k: round(s.clock.reserved.get(k, 0) / 1e9, 3) for k in STAGES}
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--order", choices=("alternate", "sequential"), default="alternate",
                    help="alternate: both pipelines loaded, systems alternated within each repeat (default); "
                    "sequential: one pipeline loaded at a time (for cards that cannot hold both, e.g. full on an H100)")
    args = ap.parse_args()
    check_common_args(ap, args)
    device, status = usable_device(args.device, args.preset)
    if device is None:
        return status

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    folder = ensure_preset(args.preset, args.workdir)
    prewarm_quant(args.quant)
    notes: list[str] = []
    systems, times, first_images = measure(args, device, folder, notes)
    rows = make_rows(args, device, systems, times, first_images)
    header = (f"{device_name(device)} · preset {args.preset} · {str(model_dtype(device)).replace('torch.', '')} · "
              f"{args.resolution}² · {args.steps} steps · guidance {args.guidance:g} · "
              f"quant {args.quant} · peer: {peer_note(args.quant, device)} · "
              f"offload {args.offload} · medians of {args.repeats} after {args.warmup} warm-up, "
              + ("systems alternated" if args.order == "alternate" else "one system at a time"))
    print_table(rows, header)
    for note in notes:
        print(f"\n{note}")
    if args.json:
        write_json(args.json, rows)
        write_chart(rows, args.json.with_suffix(".png"), header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
