"""krea2_lite's benchmarks, run from the repository root as `python -m benchmarks.NAME` (docs/benchmarks.md).

common.py (presets, the timing helper, JSON / Markdown writing), systems.py (krea2_lite and its peers),
pipeline_factory.py + builders.py (the random pipeline folders both systems load), gpu_proof/ (the one
command a lent GPU runs); the other modules are one measurement each. Nothing here imports tests/.
"""
