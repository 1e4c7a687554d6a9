"""Compile the quantized-matmul Triton kernels for real GPU targets, on a machine without a GPU.

Runs Triton's whole pipeline (TTIR → TTGIR → LLVM → PTX → ptxas cubin) for sm_80 / sm_86 / sm_89 /
sm_90 with every autotune config of each kernel, so a kernel that would not compile on a card (an
unsupported op, a dot tile below the hardware minimum, too much shared memory) fails here instead of
on a user's GPU. It proves nothing about speed or numerical results on the GPU; the interpreter
tests check the arithmetic.

    python -m benchmarks.compile_kernels                  # all targets, every config (minutes)
    python -m benchmarks.compile_kernels --quick          # sm_80 and sm_90, first config of each
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from krea2_lite.kernels import act_quant_triton as aq
from krea2_lite.kernels import qmatmul_triton as qm
from krea2_lite.kernels import w8a8_triton as wt
from krea2_lite.kernels.configs import act_quant_configs, qmatmul_configs, w8a8_configs

TARGETS = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_89": (8, 9), "sm_90": (9, 0)}


def act_quant_variants():
    sig = {"X": "*bf16", "U": "*bf16", "H": "*fp32", "Q": "*i8", "S": "*fp32", "M": "i32", "K": "i32",
           "s_xm": "i32", "s_xk": "i32", "s_qm": "i32", "inv_sqrt": "fp32"}
    for fp8 in (False, True):
        for rotate, glu in ((0, False), (128, False), (128, True)):
            flags = dict(QMAX=448.0 if fp8 else 127.0, FP8=fp8, ROTATE=bool(rotate), GLU=glu, DOT_IN_INPUT_DTYPE=True,
                         DOT_PRECISION="tf32", BIT_ROUND=False, BLOCK_K=rotate or aq.PLAIN_BLOCK_K)
            yield (f"act_quant {'fp8' if fp8 else 'int8'} rotate={rotate} glu={glu}", aq._act_quant_kernel,
                   dict(sig, Q="*u8" if fp8 else "*i8"), flags, act_quant_configs)


def w8a8_variants():
    sig = {"X": "*i8", "W": "*i8", "SX": "*fp32", "SW": "*bf16", "B": "*bf16", "Y": "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "M_BUCKET": "i32", "s_xm": "i32", "s_wn": "i32", "s_sw": "i32", "s_ym": "i32", "s_yn": "i32"}
    yield "w8a8 int8 GEMM", wt._w8a8_kernel, sig, dict(HAS_BIAS=True, BIT_ROUND=False), w8a8_configs


def qmatmul_variants():
    sig = {"X": "*bf16", "Q": "*i8", "S": "*bf16", "SH": "*bf16", "B": "*bf16", "Y": "*bf16", "M": "i32",
           "N": "i32", "K": "i32", "R": "i32", "M_BUCKET": "i32", "s_xm": "i32", "s_xk": "i32", "s_s": "i32",
           "s_ym": "i32", "s_yn": "i32"}
    for kind, name, q, group in ((0, "int8", "*i8", 1), (1, "fp8", "*u8", 1), (2, "int4", "*u8", 128)):
        flags = dict(KIND=kind, GROUP=group, HAS_BIAS=True, DOT_IN_INPUT_DTYPE=True, DOT_PRECISION="tf32",
                     BIT_ROUND=False)
        yield f"qmatmul {name}", qm._qmatmul_kernel, dict(sig, Q=q), flags, qmatmul_configs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--quick", action="store_true", help="sm_80 and sm_90 only, first config of each kernel")
    args = p.parse_args(argv)
    targets = ["sm_80", "sm_90"] if args.quick else args.targets
    failures = 0
    print("| target | kernel | config | result | compile s |")
    print("|---|---|---|---|---:|")
    for target in targets:
        cap = TARGETS[target]
        for name, fn, sig, flags, configs_fn in [*act_quant_variants(), *w8a8_variants(), *qmatmul_variants()]:
            configs = configs_fn(cap)[:1] if args.quick else configs_fn(cap)
            for cfg in configs:
                constexprs = {**flags, **cfg.kwargs}
                signature = {**sig, **{k: "constexpr" for k in constexprs}}
                label = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f",w{cfg.num_warps},s{cfg.num_stages}"
                started = time.time()
                try:
                    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                            target=GPUTarget("cuda", cap[0] * 10 + cap[1], 32),
                                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                    result = f"ok, {kernel.metadata.shared} B shared"
                except Exception as exc:  # report every failure, then exit non-zero
                    failures += 1
                    result = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
                print(f"| {target} | {name} | {label} | {result} | {time.time() - started:.1f} |", flush=True)
    print(f"\n{failures} failure(s); triton {triton.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
