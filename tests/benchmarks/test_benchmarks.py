"""`python -m benchmarks.speed` and `python -m benchmarks.vram` run end to end on the tiny preset (CPU) and
write rows for both systems. Both share one tiny pipeline folder (built once by benchmarks.pipeline_factory)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def run_script(name: str, workdir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("KREA2_LITE_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--workdir", str(workdir), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_speed_tiny_cpu(workdir):
    out = workdir / "speed.json"
    proc = run_script("speed", workdir, "--device", "cpu", "--preset", "tiny", "--steps", "2", "--repeats", "1",
                      "--json", str(out))
    rows = json.loads(out.read_text())
    assert {r["system"] for r in rows} == {"krea2_lite", "diffusers"}
    for r in rows:
        assert (r["device"].startswith("CPU"), r["preset"], r["quant"], r["offload"], r["steps"]) == \
            (True, "tiny", "none", "none", 2)
        for key in ("encode_ms", "denoise_ms", "step_ms", "decode_ms", "end_to_end_ms", "load_s"):
            assert r[key] > 0, (r["system"], key, r[key])
        assert r["other_ms"] >= 0 and r["end_to_end_ms"] > r["denoise_ms"]
        assert r["max_pixel_diff"] <= 1  # same folder, same noise, fp32: the same image
    assert "| krea2_lite |" in proc.stdout and "| diffusers |" in proc.stdout


def test_vram_tiny_cpu(workdir):
    out = workdir / "vram.json"
    proc = run_script("vram", workdir, "--device", "cpu", "--preset", "tiny", "--steps", "1", "--json", str(out))
    rows = json.loads(out.read_text())
    pipeline = [r for r in rows if r["kind"] == "pipeline"]
    assert {r["system"] for r in pipeline} == {"krea2_lite", "diffusers"}
    for system in ("krea2_lite", "diffusers"):
        stages = {r["stage"]: r for r in pipeline if r["system"] == system}
        assert set(stages) == {"imports", "load", "encode", "denoise", "decode"}
        for stage in ("load", "encode", "denoise", "decode"):
            assert stages[stage]["time_s"] > 0 and stages[stage]["peak_rss_gb"] > 0
            assert stages[stage]["process_peak_gb"] >= stages[stage]["peak_rss_gb"]
    (quant,) = [r for r in rows if r["kind"] == "quantize"]
    assert quant["quant"] == "int8" and quant["quantize_s"] > 0 and quant["quantizer_maxrss_gb"] > 0
    assert 0 < quant["output_bytes"] < quant["source_bytes"]  # fp32 source → int8 linears
    assert quant["load_quantized_s"] > 0 and quant["load_float_s"] > 0
    assert "quantize" in proc.stdout


@pytest.mark.parametrize("script, args, message", [
    ("speed", ["--offload", "cpu"], "invalid choice: 'cpu'"),
    ("vram", ["--device", "cpu", "--preset", "full"], "meant for a GPU machine"),
])
def test_bad_flags_are_refused(script, args, message, workdir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--workdir", str(workdir), *args],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_offload_benchmark_smoke_run_on_cpu():
    """Every block streamed on the CPU: the script checks the output equals the resident one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_offload", "--device", "cpu", "--preset",
                           "tiny", "--resolution", "64", "--repeats", "1", "--quant", "int4"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.endswith("× |")]
    assert len(rows) == 1 and "| 0 | 2 |" in rows[0], proc.stdout  # tiny: 0 resident, 2 streamed
