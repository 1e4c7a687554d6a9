"""int4 with a low-rank correction (int4-lr{r}) against plain int4 on one full-width block.

`python -m benchmarks.int4_lowrank [--rank 32] [--tokens 128] [--repeats 5]` builds one Krea 2
transformer block at the released width (6144, MLP 16384) in float32 with *structured* weights
(see `structured_weight`), quantizes its eight linears to int4 and to int4-lr{rank}, and prints:
  - the relative output error of each linear (random inputs, vs its float32 output) and of the
    whole block's update (block(x) − x, RoPE and modulation included), per mode;
  - the bytes of the block's quantized linears, per mode;
  - the time to quantize each linear (to extrapolate the whole 12.9B model: 28 blocks like this
    one plus the text fusion, which is small) and the block's forward time on the CPU (min of
    --repeats, the modes alternated).
Random weights have a flat spectrum, for which no rank-r branch helps; trained weights do not
(issue 19), hence the generator. Peak host memory ~5 GB (a float32 block is 1.9 GB).
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import sys
import time

import torch
import torch.nn as nn

from benchmarks.common import alternate
from krea2_lite.config import Krea2Config
from krea2_lite.model.rope import rope_tables
from krea2_lite.model.transformer import SingleStreamBlock
from krea2_lite.quantize.lowrank import LowRankQuantizedLinear
from krea2_lite.quantize.qlinear import QuantizedLinear
from krea2_lite.quantize.synthetic import structured_weight


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def linear_names(block: nn.Module) -> list[str]:
    return [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def float_block(config: Krea2Config, seed: int, **weight_kw) -> SingleStreamBlock:
    """One float32 block: structured linears, small random modulation table and norm scales."""
    block = SingleStreamBlock(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, name in enumerate(linear_names(block)):
            linear = block.get_submodule(name)
            linear.weight.copy_(structured_weight(linear.out_features, linear.in_features, seed * 100 + i,
                                                  **weight_kw))
        for name, p in block.named_parameters():
            if not name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return block.eval()


def quantized_block(source: SingleStreamBlock, config: Krea2Config, rank: int, group: int = 128,
                    rounding: str = "mse-clip") -> tuple[SingleStreamBlock, dict[str, float]]:
    """int4 (rank 0) or int4-lr{rank} copy of `source` → (block, {linear: seconds to quantize})."""
    with torch.device("meta"):
        block = SingleStreamBlock(config)
    seconds = {}
    for name in linear_names(source):
        linear = source.get_submodule(name)
        args = (linear.in_features, linear.out_features, False)
        q = LowRankQuantizedLinear(*args, group, rank, torch.float32, device="meta", rounding=rounding) if rank \
            else QuantizedLinear(*args, "int4", group, torch.float32, device="meta", rounding=rounding)
        start = time.perf_counter()
        q.set_weight(linear.weight)
        seconds[name] = time.perf_counter() - start
        log(f"rank {rank} {rounding}: {name} {tuple(linear.weight.shape)} quantized in {seconds[name]:.1f} s")
        parent, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(parent), leaf, q)
    rest = {k: v for k, v in source.state_dict().items() if not k.endswith(".weight") or "norm" in k}
    block.load_state_dict(rest, strict=False, assign=True)
    return block.eval(), seconds


def block_inputs(config: Krea2Config, tokens: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    side = int(math.isqrt(tokens))
    pos = torch.zeros(side * side, 3)
    pos[:, 1] = torch.arange(side).repeat_interleave(side).float()
    pos[:, 2] = torch.arange(side).repeat(side).float()
    x = torch.randn(1, side * side, config.features, generator=g)
    vec = torch.randn(1, 1, 6 * config.features, generator=g) * 0.1
    return x, vec, rope_tables(pos, config.axes, config.theta)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def quantized_bytes(block: nn.Module) -> int:
    """Bytes of the quantized linears as a folder stores them: codes as they are, scales, shifts and
    the low-rank branch in bf16 (this benchmark holds them in float32 to compute in float32)."""
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
               for m in block.modules() if isinstance(m, QuantizedLinear) for t in m.buffers())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="image tokens of the block forward (a square)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounding", nargs="+", default=["minmax", "mse-clip"], choices=["minmax", "mse-clip"],
                        help="int4 roundings to compare (each gives an int4 and an int4-lr pair)")
    parser.add_argument("--energy", type=float, default=2.0, help="structured/noise energy of the generator")
    parser.add_argument("--decay", type=float, default=1.0, help="power-law exponent of the spectrum")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = Krea2Config.krea2()
    source = float_block(config, seed=0, energy=args.energy, decay=args.decay)
    log("float block built")
    x, vec, rope = block_inputs(config, args.tokens)
    probe = torch.randn(args.tokens, config.features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = source(x, vec, rope)
        modes = {}
        for rounding in args.rounding:  # pairs: (int4, int4-lr) with the same rounding
            modes[f"int4 {rounding}"] = quantized_block(source, config, 0, rounding=rounding)
            modes[f"int4-lr{args.rank} {rounding}"] = quantized_block(source, config, args.rank, rounding=rounding)
        layer_errors = {}
        for name in linear_names(source):
            dense = source.get_submodule(name)
            inp = probe if dense.in_features == config.features else \
                torch.randn(args.tokens, dense.in_features, generator=torch.Generator().manual_seed(4))
            y = dense(inp)
            layer_errors[name] = {mode: rel(block.get_submodule(name)(inp), y) for mode, (block, _) in modes.items()}
        log(f"layer errors: {layer_errors}")
        del source  # the float block is no longer needed: room for the timed forwards
        update = reference - x
        block_errors = {mode: rel(block(x, vec, rope) - x, update) for mode, (block, _) in modes.items()}
        log(f"block errors: {block_errors}")
        # alternate the modes: CPU timings here are bimodal; the minimum, in seconds
        samples = alternate({mode: functools.partial(block, x, vec, rope) for mode, (block, _) in modes.items()},
                            "cpu", args.repeats)
        times = {mode: min(ms) / 1e3 for mode, ms in samples.items()}
    report(args, config, modes, layer_errors, block_errors, times)
    return 0


def report(args, config, modes, layer_errors, block_errors, times) -> None:
    names = list(modes)
    pairs = [(names[i], names[i + 1]) for i in range(0, len(names), 2)]  # (int4, int4-lr) per rounding
    print(f"\nOne Krea 2 block (width {config.features}, MLP {config.mlpdim}), structured weights "
          f"(energy {args.energy}, decay {args.decay}, 4 outlier columns ×10), {args.tokens} tokens, CPU "
          f"({platform.processor() or platform.machine()}, {args.threads} thread(s)), torch {torch.__version__}\n")
    print("| linear | " + " | ".join(f"{m} rel. error" for m in names) + " | "
          + " | ".join(f"ratio ({b.split()[-1]})" for _, b in pairs) + " |")
    print("|---|" + "---:|" * (len(names) + len(pairs)))
    for name, errors in list(layer_errors.items()) + [("**block update**", block_errors)]:
        print(f"| {name} | " + " | ".join(f"{errors[m]:.4f}" for m in names) + " | "
              + " | ".join(f"{errors[b] / errors[a]:.3f}" for a, b in pairs) + " |")
    print("\n| mode | bytes of the block's linears | vs int4 | quantize time (s) | forward (s, min) |")
    print("|---|---:|---:|---:|---:|")
    for plain, corrected in pairs:
        base = quantized_bytes(modes[plain][0])
        for mode in (plain, corrected):
            block, seconds = modes[mode]
            size = quantized_bytes(block)
            print(f"| {mode} | {size:,} | {size / base - 1:+.1%} | {sum(seconds.values()):.1f} | {times[mode]:.3f} |")
    blocks_equiv = config.layers + 1  # 28 blocks + the text fusion (< one block of weights), rounded up
    for _, corrected in pairs:
        lr_seconds = sum(modes[corrected][1].values())
        print(f"\nfull model at {corrected} ≈ {blocks_equiv} × {lr_seconds:.0f} s = "
              f"{blocks_equiv * lr_seconds / 60:.0f} min of quantization work on this CPU at {args.threads} "
              "thread(s) (plus reading the checkpoint)")


if __name__ == "__main__":
    raise SystemExit(main())
