"""One local Ray instance for every test in this folder (starting Ray costs 5–20 s on 2 cores)."""

import os

import pytest

ray = pytest.importorskip("ray", reason="Ray is the `ray` extra: pip install -e '.[ray]'")


@pytest.fixture(scope="package")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway loopback instance
    # Workers inherit this process's environment (PYTHONPATH included): the instance is started here.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
