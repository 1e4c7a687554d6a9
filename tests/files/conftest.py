"""Fixtures for the hub tests: the official-layout repo (built once) served by a fake hub, and the
real huggingface_hub client pointed at it with a fresh cache and no token, per test."""

from __future__ import annotations

import pytest

from fake_hub import FakeHub
from official_layout import REPO, build_official_repo


@pytest.fixture(scope="session")
def official_repo(tmp_path_factory):
    return build_official_repo(tmp_path_factory.mktemp("hub") / "Krea-2-Turbo")


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A fresh hub cache and no credentials; returns the cache folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache / "token"))  # never this machine's login
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(cache / "stored_tokens"))
    return cache / "hub"


@pytest.fixture
def fake_hub(official_repo, hub_env, monkeypatch):
    """The official-layout repo served as krea/Krea-2-Turbo on a loopback fake hub (HF_ENDPOINT set)."""
    with FakeHub(lifetime_s=300) as hub:
        hub.commit = hub.add(REPO, official_repo)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub
