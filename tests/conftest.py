"""Test-wide setup. Kernels are exercised under the Triton interpreter when no GPU is present."""

import os

# Must happen before anything imports triton: the interpreter is chosen at import time.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def cuda_device():
    """A CUDA device, or a clean skip on machines without one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models are all per-op overhead: one intra-op thread is faster and steadier on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
