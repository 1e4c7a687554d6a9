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


@pytest.fixture(scope="module")
def source(request, tmp_path_factory):
    """A tiny random checkpoint with the official key names, for the test module's `CFG`
    (diffusers' initialisation, seed 1). Modules that need another one define their own."""
    from safetensors.torch import save_file

    from factories import diffusers_transformer, official_state_dict

    path = tmp_path_factory.mktemp("source") / "krea2.safetensors"
    save_file(official_state_dict(diffusers_transformer(request.module.CFG, seed=1)), path)
    return path


@pytest.fixture
def spy(monkeypatch):
    """`calls = spy(module, "name")`: wraps module.name so each call appends to `calls` (and runs it)."""

    def install(owner, name: str) -> list:
        calls, real = [], getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
        return calls

    return install
