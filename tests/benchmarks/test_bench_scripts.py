"""The single-measurement benchmarks run on a CPU (moved here from tests/lora and tests/kernels when the
benchmarks became a package): each runs as `python -m benchmarks.NAME`, or in this process where a second
torch + optimum-quanto import would cost ~10 s."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from krea2_lite import Krea2Config, Krea2Transformer

ROOT = Path(__file__).resolve().parents[2]


def run_module(name: str, *args) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def linear_names(model) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or hasattr(m, "qdata")}


def test_lora_benchmark_runs_on_tiny_cpu(tmp_path, capsys):
    from benchmarks import bench_lora  # in-process: a subprocess would spend ~10 s importing optimum-quanto

    out = tmp_path / "lora.json"
    assert bench_lora.main(["--device", "cpu", "--preset", "tiny", "--resolution", "64", "--dtype", "int4", "--rank",
                            "4", "--repeats", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    with torch.device("meta"):
        shapes = linear_names(Krea2Transformer(Krea2Config.tiny()))
    expected = sum(4 * (o + i) * 4 for n, (o, i) in shapes.items() if n.startswith("blocks."))  # fp32 on CPU
    assert row["lora_mb"] == pytest.approx(expected / 1e6)
    assert row["quant"] == "int4" and row["quantized_unchanged"] is True and row["added_mb"] is None
    assert row["step_ms"] > 0 and row["lora_step_ms"] > 0 and "| CPU | tiny | int4 | 4 |" in capsys.readouterr().out


def test_kernel_benchmark_skips_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA: the benchmark would run")
    assert "skipped: needs CUDA" in run_module("bench_kernels", "--only", "matmul", "--tokens", "16")


@pytest.mark.slow
def test_w8a8_error_script_runs_small():
    out = run_module("w8a8_error", "--what", "linears", "--width", "256", "--hidden", "512", "--tokens", "16",
                     "--threads", "1")
    assert "| mlp down 256×512 | 16 | int8 W8A8 + rotation |" in out


@pytest.mark.slow
def test_kernels_compile_for_gpu_targets():
    """Every quantized-matmul kernel compiles to a cubin for sm_80 and sm_90 (no GPU needed)."""
    out = run_module("compile_kernels", "--quick")
    assert "0 failure(s)" in out and out.count("| ok,") >= 20
