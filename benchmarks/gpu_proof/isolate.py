"""Correctness checks in a child process, restarted past a check that kills it.

A Triton kernel that writes out of bounds passes under the interpreter and may raise "an illegal memory
access" on a GPU; such an error is sticky: every later CUDA call in that process fails. So on CUDA the
checks run in a child (`python -m benchmarks.gpu_proof --sections checks`), which marks each check it starts in its JSON
(`running`); if the child dies, the check it was running is recorded as failed with the exit status and
the last line it printed, and a fresh child runs the remaining checks. The timings then run in this
process on a clean CUDA context.

GPU_PROOF_ABORT_AT=<check name> makes a child die at the start of that check (how the restart is tested).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: the child is `python -m benchmarks.gpu_proof`
ABORT_ENV = "GPU_PROOF_ABORT_AT"


def child_argv(args, out: Path, budget_s: float, skip: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.gpu_proof", "--device", args.device, "--preset", args.preset,
            "--json", str(out), "--budget-s", f"{max(1.0, budget_s):.0f}", "--sections", "checks",
            "--isolate", "off", "--resolution", str(args.resolution), "--text-tokens", str(args.text_tokens)]
    if args.only_checks:
        argv += ["--only-checks", args.only_checks]
    if skip:
        argv += ["--skip-checks", ",".join(skip)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_isolated(args, rec, section, tmp: Path) -> None:
    """Run the checks in children until all ran or the section's time is spent."""
    done: list[str] = []
    attempt = 0
    while section.left() > 5:
        attempt += 1
        out = tmp / f"checks-{attempt}.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        try:
            proc = subprocess.run(child_argv(args, out, section.left() - 5, done), capture_output=True, text=True,
                                  env=env, cwd=ROOT, timeout=section.left() + 30)
            code, tail = proc.returncode, _last_line(proc.stderr or proc.stdout)
            print(proc.stdout, end="", flush=True)
        except subprocess.TimeoutExpired:  # the child's own budget should have ended it first
            code, tail = "timeout", "the checks child overstayed its budget"
        child = json.loads(out.read_text()) if out.exists() else {}
        for check in child.get("checks", []):
            if check["name"] not in done:
                rec.add("checks", check)
                done.append(check["name"])
        if code in (0, 1) and child.get("complete"):
            return
        running = child.get("running")
        if running is None or running in done:  # died before its first check, or between checks
            rec.skip_check(f"checks-child-{attempt}", f"the checks process ended (exit {code}) outside a check: {tail}")
            return
        rec.add("checks", {"name": running, "ok": False, "s": None,
                           "detail": f"the process died running this check (exit {code}): {tail}"})
        done.append(running)
        print(f"[check] {running}: FAILED — the process died (exit {code}); restarting for the rest", flush=True)
