"""`python -m benchmarks.speed` with --quant: the diffusers peer is quantized by optimum-quanto at the same weight type."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("diffusers")
pytest.importorskip("optimum.quanto")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_quant")  # one tiny preset folder for both tests


def test_speed_int8_has_a_quanto_quantized_diffusers_row(workdir):
    out = workdir / "speed.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("KREA2_LITE_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--workdir", str(workdir),
                           "--device", "cpu", "--preset", "tiny", "--quant", "int8", "--steps", "1", "--repeats", "1",
                           "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["system"]: r for r in json.loads(out.read_text())}
    assert {"krea2_lite", "diffusers"} <= set(rows)
    peer = rows["diffusers"]
    assert peer["weights"] == "int8 (quanto)" and peer["quant"] == "int8"
    assert rows["krea2_lite"]["weights"].startswith("int8")
    for r in rows.values():
        assert r["min_step_ms"] > 0 and r["min_end_to_end_ms"] > 0 and r["min_step_vs_peer"] > 0
    assert peer["min_step_vs_peer"] == 1.0
    assert "diffusers + optimum-quanto int8" in proc.stdout and "| int8 (quanto) |" in proc.stdout
    try:
        import torchao  # noqa: F401  (optional: the third row appears only where it is installed)
    except ImportError:
        assert "diffusers+torchao" not in rows
    else:
        assert rows["diffusers+torchao"]["weights"] == "int8 (torchao)"


def test_the_peer_really_is_quanto_quantized(workdir):
    """The row's label is backed by the model: the peer's transformer linears are quanto QLinear, int8."""
    import torch
    from optimum.quanto import QLinear, qint8

    from benchmarks.pipeline_factory import ensure_preset
    from benchmarks.systems import Peer

    folder = ensure_preset("tiny", workdir)
    peer = Peer(folder=folder, device=torch.device("cpu"), quant="int8-w8a8-rot", steps=1, guidance=0.0,
                resolution=64, max_sequence_length=32)
    linears = [m for m in peer.pipe.transformer.modules() if isinstance(m, QLinear)]
    assert linears and all(m.weight_qtype == qint8 for m in linears)
    assert peer.weights == "int8 (quanto, weights only)"  # quanto via diffusers has no W8A8 path
