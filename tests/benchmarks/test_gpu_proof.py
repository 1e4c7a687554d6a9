"""The GPU proof (`python -m benchmarks.gpu_proof`): the CPU dry run (`--device cpu --preset tiny`) runs every check and every timing
row at a tiny shape, so the script a lent GPU runs unattended cannot rot; and the auto table it derives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("diffusers")

# The check paths issue 16 names (a name may be a prefix of more specific checks: `w8a8/fp8/rot/auto`).
ISSUE_CHECKS = ["qmatmul/int8/triton", "w8a8/fp8/rot", "attention/fused", "stream/prefetch2", "swap/model",
                "lora/stream", "oom/replan", "folder/cpu-to-cuda"]
QUANTS = ["bf16", "int8", "fp8", "int4", "int8-w8a8", "int8-w8a8-rot", "fp8-w8a8"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("proof") / "proof.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TRITON_INTERPRET": "1"}
    env.pop("KREA2_LITE_KERNELS", None)
    env.pop("KREA2_LITE_TUNING", None)
    # A generous budget: on a shared machine nothing may be skipped for time (alone it takes ~1 min).
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_proof", "--device", "cpu", "--preset",
                           "tiny", "--json", str(out), "--budget-s", "1500"],
                          capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), out, proc.stdout


def named(checks, path):
    return [c for c in checks if c["name"] == path or c["name"].startswith(path + "/")]


def test_schema(result):
    data, _, _ = result
    assert data["device"].startswith("CPU") and data["torch"] and data["complete"] is True
    for check in data["checks"]:
        assert isinstance(check["name"], str) and isinstance(check["ok"], bool) and isinstance(check["detail"], str)
    for row in data["timings"]:
        assert {"case", "system", "quant", "ms"} <= set(row), row


def test_every_check_runs_and_passes_on_the_cpu(result):
    checks = result[0]["checks"]
    for path in ISSUE_CHECKS:
        assert named(checks, path), f"no check named {path}"
    for kernel in ("int8", "fp8", "int4"):
        for backend in ("triton", "auto"):
            assert named(checks, f"qmatmul/{kernel}/{backend}")
    for act in ("int8", "fp8"):
        for rot in ("", "/rot"):
            parts = ["quantizer", "auto", "triton"] + (["int_mm", "gemm-triton"] if act == "int8" else ["scaled_mm"])
            for part in parts:
                assert named(checks, f"w8a8/{act}{rot}/{part}"), f"w8a8/{act}{rot}/{part}"
    for path in ("attention/triton", "attention/auto", "stream/prefetch1"):
        assert named(checks, path)
    bad = [(c["name"], c["detail"]) for c in checks if not c["ok"] or c.get("skipped")]
    assert not bad, bad
    assert all("bit-identical" in c["detail"] for c in named(checks, "stream") + named(checks, "swap/model"))


def test_every_timing_row_is_measured(result):
    data, _, _ = result
    rows = data["timings"]
    missing = [(r["case"], r["system"], r["quant"], r.get("backend"), r["detail"]) for r in rows if r["ms"] is None]
    assert not missing, missing
    steps = [r for r in rows if r.get("kind") == "step"]
    for quant in QUANTS:
        for batch in (1, 2):
            for backend in ("auto", "triton"):
                (row,) = [r for r in steps if (r["system"], r["quant"], r["batch"], r["backend"]) ==
                          ("krea2_lite", quant, batch, backend)]
                assert row["ms"] > 0 and row["ratio_to_bf16"] > 0
    for system, quants in (("diffusers", ["bf16"]), ("diffusers+quanto", ["int8", "fp8", "int4"])):
        for quant in quants:
            assert len([r for r in steps if r["system"] == system and r["quant"] == quant]) == 2, (system, quant)
    peer = [r for r in steps if r["system"] == "diffusers+quanto"]
    assert all(r["krea2_lite_speedup"] > 0 for r in peer)
    stream = [r for r in rows if r.get("kind") == "stream" and r.get("cap_gib") is not None]
    assert {(r["quant"], r["cap_gib"]) for r in stream} >= {("int8", 12.0), ("int8", 16.0), ("int4", 8.0),
                                                          ("bf16", 16.0)}
    assert all(r["ok"] and r["ratio_to_resident"] > 0 and "bit-identical" in r["detail"] for r in stream)
    layers = [r for r in rows if r.get("kind") == "layer"]
    assert {(r["kernel"], r["quant"], r["choice"]) for r in layers} >= {
        ("qmatmul", "int4", "triton"), ("w8a8", "int8", "dequant"), ("w8a8", "fp8", "triton"), ("bf16", "bf16", "cublas"),
        ("int4-lr", "int4-lr32", "auto")}
    assert all(r["ms"] is not None for r in layers if r["kernel"] == "int4-lr")


def test_goals_markdown_and_sections(result):
    data, out, stdout = result
    assert len(data["goals"]) == 14 and all({"goal", "value", "target", "met"} <= set(g) for g in data["goals"])
    assert [s["name"] for s in data["sections"]] == ["checks", "layers", "steps", "stream", "quanto"]
    text = out.with_suffix(".md").read_text()
    assert "## Checks" in text and "## Timings" in text and "diffusers+quanto" in text
    assert "checks ok" in stdout


def proof_main(*argv):
    """The proof's main in this process (no second torch import)."""
    from benchmarks.gpu_proof.runner import main

    return main(list(argv))


def test_a_cpu_result_never_fills_the_table(result, tmp_path, capsys):
    table = tmp_path / "tuning.json"
    assert proof_main("--table-from", str(result[1]), "--write-table", str(table)) == 0
    assert "not from a GPU" in capsys.readouterr().out and not table.exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert proof_main("--table-from", str(bad)) == 2
    assert str(bad) in capsys.readouterr().err


def layer(kernel, quant, choice, tokens, ms):
    return dict(kind="layer", case=f"layer 16384×6144 M={tokens}", system="krea2_lite", kernel=kernel, quant=quant,
                choice=choice, tokens=tokens, ms=ms)


def test_table_entry_takes_the_fastest_correct_choice(tmp_path):
    from benchmarks.gpu_proof.layers import derive_entry
    from krea2_lite.kernels import tuning

    rows = []
    for m, (triton, torch_ms) in {64: (1.0, 2.0), 512: (1.5, 2.0), 4160: (9.0, 6.0)}.items():
        rows += [layer("qmatmul", "int8", "triton", m, triton), layer("qmatmul", "int8", "torch", m, torch_ms),
                 layer("qmatmul", "int4", "triton", m, triton), layer("qmatmul", "int4", "torch", m, torch_ms),
                 layer("w8a8", "int8", "torch", m, 5.0), layer("w8a8", "int8", "triton", m, 4.0),
                 layer("w8a8", "int8", "dequant", m, 4.99)]
    checks = [{"name": "qmatmul/int8/triton", "ok": True, "detail": ""},
              {"name": "qmatmul/int4/triton", "ok": False, "detail": "wrong"},  # never chosen: it failed its check
              {"name": "w8a8/int8/triton", "ok": True, "detail": ""},
              {"name": "w8a8/int8/rot/triton", "ok": True, "detail": ""},
              {"name": "w8a8/int8/dequant", "ok": True, "detail": ""}]
    result = {"device": "NVIDIA H200", "capability": [9, 0], "checks": checks, "timings": rows}
    entry = derive_entry(result)
    assert entry["qmatmul"]["int8"] == [[0, "triton"], [4160, "torch"]]
    assert entry["qmatmul"]["int4"] == [[0, "torch"]]
    assert entry["w8a8"]["int8"] == [[0, "triton"], [4161, "torch"]]  # beyond what was measured: the default
    path = tmp_path / "tuning.json"
    proof = tmp_path / "proof.json"
    proof.write_text(json.dumps(result))
    assert proof_main("--table-from", str(proof), "--write-table", str(path)) == 0
    rules = tuning.lookup(tuning.validate(tuning.read_table(path), str(path)), "NVIDIA H200", (9, 0))
    assert tuning.choose(rules, "qmatmul", "int8", 100) == "triton"
    assert tuning.choose(rules, "qmatmul", "int8", 8320) == "torch"


@pytest.mark.slow  # three processes start (~35 s of CPU); the default run covers the in-process checks
def test_a_check_that_kills_its_process_is_recorded_and_the_rest_still_run(tmp_path):
    """On CUDA the checks run in a child (a kernel's illegal memory access poisons the process); a child that
    dies is replaced and the check it was running is recorded as failed. Forced here with --isolate on."""
    out = tmp_path / "proof.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TRITON_INTERPRET": "1",
           "GPU_PROOF_ABORT_AT": "w8a8/int8/auto"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_proof", "--device", "cpu", "--json",
                           str(out), "--sections", "checks", "--isolate", "on", "--no-peer", "--budget-s", "900",
                           "--only-checks", "qmatmul/int8/auto,w8a8/int8/auto,attention/auto"],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert list(checks) == ["qmatmul/int8/auto", "w8a8/int8/auto", "attention/auto"]
    assert checks["qmatmul/int8/auto"]["ok"] and checks["attention/auto"]["ok"]
    dead = checks["w8a8/int8/auto"]
    assert not dead["ok"] and "the process died running this check (exit 134)" in dead["detail"]


@pytest.mark.parametrize("build, expected", [
    ("running", "not measured: extension build exceeded"),  # killed when the section's time runs out
    ("failed (exit 1): nvcc not found", "not measured: extension build failed (exit 1): nvcc not found"),
    ("built", None),
])
def test_quanto_peer_waits_for_the_extension_build_within_the_section(tmp_path, monkeypatch, build, expected):
    """On CUDA the int4 / fp8 peers need quanto's extension; the int8 peer runs first, then the others only if the
    background build finished in time, else their rows say why (no GPU needed: the children are stubbed)."""
    import argparse

    import torch

    from benchmarks.gpu_proof import quanto as proof_quanto
    from benchmarks.gpu_proof.record import Budget, Recorder
    from benchmarks.gpu_proof.report import markdown

    runs, killed = [], []

    def fake_peer(ctx, quants, seconds):
        runs.append(list(quants))
        return {(q, b): [10.0, 11.0, 12.0] for q in quants for b in (1, 2)}, {}, None

    class FakePrewarm:
        proc = "build"

        def state(self):
            return build

        def wait(self, seconds):
            return build

        def elapsed(self):
            return 123.0

    monkeypatch.setattr(proof_quanto, "_run_peer", fake_peer)
    monkeypatch.setattr(proof_quanto, "kill", killed.append)
    ctx = argparse.Namespace(device=torch.device("cuda"), resolution=1024, text_tokens=64, estimates=argparse.Namespace(
        build_s=10.0, row=lambda batch, systems=1: 5.0))
    rec = Recorder(tmp_path / "r.json", {"device": "test", "torch": "x"}, markdown)
    section = Budget(600, {"quanto": 1.0}).open("quanto")
    proof_quanto.quanto_rows(ctx, rec, section, FakePrewarm())
    rows = {(r["quant"], r["batch"]): r for r in rec.data["timings"]}
    assert len(rows) == 6 and rows[("int8", 1)]["ms"] == 11.0 and rows[("int8", 2)]["system"] == "diffusers+quanto"
    if expected is None:
        assert runs == [["int8", "int4", "fp8"]] and all(r["ms"] for r in rows.values())
    else:
        assert runs == [["int8"]]
        for quant in ("int4", "fp8"):
            assert rows[(quant, 1)]["ms"] is None and rows[(quant, 1)]["detail"].startswith(expected)
        assert killed == (["build"] if build == "running" else [])
