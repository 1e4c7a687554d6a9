"""One command that proves the GPU path: every CUDA code path checked, then timed, within a time budget.

    python -m benchmarks.gpu_proof --device cuda --json OUT.json [--budget-s 420] [--write-table]
    python -m benchmarks.gpu_proof --device cpu --preset tiny --json /tmp/proof.json      # dry run (~1 min)
    python -m benchmarks.gpu_proof --table-from OUT.json [--write-table PATH]             # fill the auto table

Writes OUT.json — {"device", "torch", "checks": [{"name", "ok", "detail"}...], "timings": [{"case",
"system", "quant", "ms", ...}...], "goals", "sections", ...} — and OUT.md beside it, both rewritten
atomically after every row, so a run killed from outside still leaves everything measured so far.

Sections, in order, each with a deadline from --budget-s (weights below; time a section leaves unused
rolls over to the later ones). Whatever would not fit is recorded as skipped with the reason; an
exception (out of memory, a compile error) fails that one check or row and the run carries on.
  checks   (correctness.py) correctness on the device vs the CPU/torch reference: pipeline streaming (prefetch 1, 2),
           model swapping, LoRA beside streaming, the OOM re-plan under a real memory cap, quantized
           folders written on the CPU loaded on the device; qmatmul int8/fp8/int4 (triton, auto);
           W8A8 int8/fp8 ± rotation (quantizer, _int_mm, _scaled_mm, Triton GEMM, whole layers);
           attention and fused attention (pipeline_checks.py, kernel_checks.py)
  layers   one MLP-sized layer per token count and per choice `auto` can make (layers.py)
  steps    full-shape transformer step (12.9B, random weights, 1024², batch 1 and 2 = CFG) for bf16,
           int8, fp8, int4, int8-w8a8, int8-w8a8-rot, fp8-w8a8 × KREA2_LITE_KERNELS auto / triton, and
           diffusers' bf16 Krea2Transformer2DModel on the same weights (timings.py)
  stream   streamed vs resident CFG steps under simulated 8 / 12 / 16 GB cards
           (torch.cuda.set_per_process_memory_fraction, reset afterwards) for int8, int4, bf16
  quanto   diffusers + optimum-quanto int8 / int4 / fp8, last, in a time-boxed child process; quanto's
           CUDA extension is built in the background from the start (quanto.py)
Every timing row carries its ratio to the bf16 step of the same run; `goals` holds the issue's targets.

`--write-table [PATH]` (default: krea2_lite/kernels/tuning.json) puts this GPU's measured `auto` choices
into the table; on a lent machine whose files do not come back, run `--table-from OUT.json` afterwards
where the repository lives. GPUs the table does not name keep the safe defaults.


Modules: runner.py (arguments, header, budget, watchdog), sections.py (the list of sections: add one
there), checks.py + kernel_checks.py + pipeline_checks.py + isolate.py (the `checks` section), layers.py,
timings.py (`steps`, `stream`), quanto.py (the peer, also the child `python -m benchmarks.gpu_proof.quanto`),
record.py (budget, JSON + Markdown record), report.py (ratios, goals, the table), context.py (model shape).
"""
