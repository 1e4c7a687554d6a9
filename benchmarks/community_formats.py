"""Community files (GGUF, ComfyUI fp8) against this library's own quantized layers, on the CPU.

`python -m benchmarks.community_formats [--width 6144] [--mlp 16384] [--tokens 64]
[--repeats 5] [--skip-block] [--skip-demo]` prints three tables:

1. layer time: one (mlp × width) linear (the 12.9B model's MLP up projection at full width) in bf16,
   this library's int8 / int4 QuantizedLinear, and GGUFLinear Q8_0 / Q4_K (dequantize-per-call
   torch path: what `auto` runs on a CPU). Minimum over `--repeats` rounds, the formats alternated
   inside each round (CPU timings here are bimodal: medians mislead).
2. block error: one full-width transformer block (random N(0, 0.02) weights, random input and
   modulation) with every linear stored as each format, output error relative to what the bf16
   block adds to its input (‖y_fmt − y_bf16‖ / ‖y_bf16 − x‖, float32 compute). Q8_0 / Q5_x / Q4_x
   are the `gguf` package's quantizers; K-quants are not measured (the package cannot write them).
3. demo: the trained demo transformer written as Q8_0 GGUF and as a legacy scaled-fp8 ComfyUI file,
   loaded through `generate --transformer`, PSNR of its images against fp32's (4 prompts, 64²).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from krea2_lite import Krea2Config, load_transformer
from krea2_lite.files.gguf_container import BLOCK_TYPES
from krea2_lite.kernels.gguf_dequant_torch import dequantize_gguf
from krea2_lite.model.rope import rope_tables
from krea2_lite.model.transformer import SingleStreamBlock
from krea2_lite.quantize import QuantizedLinear
from krea2_lite.quantize.gguf_linear import GGUFLinear

GGUF_ERROR_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def random_k_blocks(qtype: str, rows: int, cols: int) -> torch.Tensor:
    """Valid blocks of a K-quant (random bits, small fp16 d / dmin): for timing only."""
    block, size = BLOCK_TYPES[qtype]
    data = torch.randint(0, 256, (rows, cols // block, size), dtype=torch.uint8)
    d = torch.full((rows, cols // block, 2), 0.01, dtype=torch.float16).view(torch.uint8).reshape(rows, -1, 4)
    offsets = {"Q4_K": (0, 2), "Q6_K": (208,)}[qtype]
    for i, off in enumerate(offsets):
        data[..., off:off + 2] = d[..., 2 * i:2 * i + 2]
    return data.reshape(rows, -1)


def gguf_bytes(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(quantize(weight.detach().float().numpy(), GGMLQuantizationType[qtype]))


def layer_modules(width: int, mlp: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = torch.nn.Linear(width, mlp, bias=False).to(torch.bfloat16)
    torch.nn.init.normal_(dense.weight, std=0.02)
    out = {"bf16": dense,
           "int8": QuantizedLinear.from_linear(dense, "int8", None),
           "int4": QuantizedLinear.from_linear(dense, "int4", 128, rounding="minmax")}
    for qtype in ("Q8_0", "Q4_K"):
        layer = GGUFLinear(width, mlp, False, qtype, torch.bfloat16)
        layer.qdata = gguf_bytes(dense.weight, qtype) if qtype == "Q8_0" else random_k_blocks(qtype, mlp, width)
        out[f"gguf {qtype}"] = layer
    return out


def time_layers(width: int, mlp: int, tokens: int, repeats: int) -> None:
    modules = layer_modules(width, mlp)
    x = torch.randn(tokens, width, dtype=torch.bfloat16)
    best = {name: float("inf") for name in modules}
    with torch.no_grad():
        for _ in range(repeats):
            for name, module in modules.items():
                start = time.perf_counter()
                module(x)
                best[name] = min(best[name], time.perf_counter() - start)
    print(f"\n## layer time: ({mlp} × {width}) linear, {tokens} tokens, bf16 activations, "
          f"{torch.get_num_threads()} threads, min of {repeats} alternated rounds")
    print("| format | stored MB | ms |\n|---|---:|---:|")
    for name, module in modules.items():
        stored = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        print(f"| {name} | {stored / 1e6:.1f} | {best[name] * 1e3:.1f} |")


def _fp8_scaled(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().max() / 448
    return (w / scale).to(torch.float8_e4m3fn).float() * scale


def _dequantized(w: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt in GGUF_ERROR_TYPES:
        return dequantize_gguf(gguf_bytes(w, fmt), fmt, tuple(w.shape))
    if fmt == "fp8 scaled (ComfyUI)":
        return _fp8_scaled(w)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.to(torch.bfloat16)
    if fmt == "int8":
        return QuantizedLinear.from_linear(linear, "int8", None).dequantize()
    return QuantizedLinear.from_linear(linear, "int4", 128, rounding="mse-clip").dequantize()


def block_error(width: int, tokens: int) -> None:
    cfg = Krea2Config.krea2().replace(features=width, heads=width // 128, kvheads=max(1, width // 512), layers=1)
    torch.manual_seed(1)
    block = SingleStreamBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.02)
    original = {name: m.weight.detach().to(torch.bfloat16).float() for name, m in block.named_modules()
                if isinstance(m, torch.nn.Linear)}
    x = torch.randn(1, tokens, width)
    vec = torch.randn(1, 6 * width) * 0.1
    pos = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 8, torch.arange(tokens) % 8], dim=-1).float()
    rope = rope_tables(pos, cfg.axes, cfg.theta)

    def run(weights):
        for name, w in weights.items():
            block.get_submodule(name).weight.data = w
        with torch.no_grad():
            return block(x, vec, rope)

    reference = run(original)
    delta = (reference - x).norm()
    print(f"\n## block error: one block at width {width} (MLP {cfg.mlpdim}), {tokens} tokens, float32 compute")
    print("| format | ‖y − y_bf16‖ / ‖y_bf16 − x‖ |\n|---|---:|")
    for fmt in (*GGUF_ERROR_TYPES, "fp8 scaled (ComfyUI)", "int8", "int4"):
        y = run({name: _dequantized(w, fmt) for name, w in original.items()})
        print(f"| {fmt} | {float((y - reference).norm() / delta):.4f} |")
    print("| Q4_K / Q6_K | not measured: the gguf package has no K-quant quantizer |")


def _write_demo_files(folder: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    from krea2_lite.demo import demo_path

    state = load_transformer(demo_path() / "transformer", dtype=torch.float32).state_dict()
    writer = GGUFWriter(str(folder / "demo-Q8_0.gguf"), "krea2")
    fp8 = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for name, value in state.items():
        value = value.float().contiguous()
        if value.ndim == 2 and value.shape[1] % 32 == 0:
            data = gguf_bytes(value, "Q8_0").numpy()
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, value.numpy())
        prefix = "model.diffusion_model."
        if name.startswith("blocks.") and value.ndim == 2:
            scale = value.abs().max() / 448
            fp8[prefix + name] = (value / scale).to(torch.float8_e4m3fn)
            fp8[prefix + name[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            fp8[prefix + name] = value.to(torch.bfloat16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(fp8, folder / "demo-fp8.safetensors")
    return folder / "demo-Q8_0.gguf", folder / "demo-fp8.safetensors"


def demo_psnr() -> None:
    from PIL import Image

    from krea2_lite.__main__ import main

    prompts = ["a small red circle at the top left on a blue background",
               "a large green square at the bottom right on a white background",
               "a small yellow triangle in the center on a black background",
               "a large blue circle at the top right on a red background"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
        files = dict(zip(("Q8_0 GGUF", "scaled fp8 (ComfyUI)"), _write_demo_files(folder)))
        base = ["generate", "--prompts", str(folder / "prompts.txt"), "--model", "demo", "--dtype", "fp32",
                "--quiet", "--seed", "0"]
        images = {}
        for name, path in [("fp32", None), *files.items()]:
            out = folder / name.replace(" ", "_")
            out.mkdir()
            extra = [] if path is None else ["--transformer", str(path)]
            main([*base, *extra, "--output", str(out) + "/"])
            images[name] = [np.asarray(Image.open(p), np.float64) for p in sorted(out.glob("*.png"))]
        print("\n## demo: generate --transformer FILE vs fp32 (4 prompts, 64², seed 0)")
        print("| file | bytes | PSNR dB |\n|---|---:|---:|")
        for name, path in files.items():
            mse = np.mean([(a - b) ** 2 for a, b in zip(images[name], images["fp32"])])
            print(f"| {name} | {path.stat().st_size} | {10 * np.log10(255 ** 2 / mse):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=6144)
    parser.add_argument("--mlp", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-block", action="store_true")
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    print(f"# community formats on {platform.processor() or platform.machine()}, torch {torch.__version__}")
    time_layers(args.width, args.mlp, args.tokens, args.repeats)
    if not args.skip_block:
        block_error(args.width, args.tokens)
    if not args.skip_demo:
        demo_psnr()


if __name__ == "__main__":
    main()
