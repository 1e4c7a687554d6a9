"""Gated, missing, unreachable, offline and full-disk cases: each one typed error, one line saying
what to do, raised before any large file is downloaded."""

from __future__ import annotations

import pytest

from fake_hub import FakeHub
from krea2_lite.cli.subcommands import main as cli_main
from official_layout import REPO
from krea2_lite.errors import (DiskSpaceError, HubAccessError, HubConnectionError, HubNotFoundError,
                               HubOfflineError, Krea2LiteError)
from krea2_lite.files import hub_fetch
from krea2_lite.loading import resolve_pipeline

LARGE = ".safetensors"


def _large(hub) -> list[str]:
    return [f for f in hub.downloads() if f.endswith(LARGE)]


def test_gated_without_login_says_log_in(fake_hub, capsys):
    fake_hub.repos[REPO].gated = True
    with pytest.raises(HubAccessError) as info:
        resolve_pipeline(REPO, progress=False)
    assert info.value.reason == "not-logged-in"
    assert "hf auth login" in str(info.value) and f"{fake_hub.url}/{REPO}" in str(info.value)
    assert fake_hub.requests[0].token is None and fake_hub.downloads() == []
    assert cli_main(["generate", "a cat", "--quiet", "--model", REPO]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not logged in" in err, err


def test_gated_with_a_token_but_no_access_says_accept_the_license(fake_hub, monkeypatch):
    fake_hub.repos[REPO].gated = True
    monkeypatch.setenv("HF_TOKEN", "hf_not_approved")
    with pytest.raises(HubAccessError) as info:
        resolve_pipeline(REPO, progress=False)
    assert info.value.reason == "not-approved" and "accept the license" in str(info.value)
    assert "hf auth login" not in str(info.value)
    fake_hub.tokens_with_access.add("hf_approved")
    monkeypatch.setenv("HF_TOKEN", "hf_approved")
    assert resolve_pipeline(REPO, progress=False).revision == fake_hub.commit
    assert {r.token for r in fake_hub.requests} >= {"hf_approved"}


def test_missing_repo_revision_and_file_each_have_their_line(fake_hub):
    with pytest.raises(HubNotFoundError, match="has no repository krea/Nope"):
        resolve_pipeline("krea/Nope", progress=False)
    with pytest.raises(HubNotFoundError, match="has no revision 'v9'"):
        resolve_pipeline(REPO, revision="v9", progress=False)
    with pytest.raises(HubNotFoundError, match="has no file nope.safetensors"):
        resolve_pipeline(REPO, transformer=f"{REPO}/nope.safetensors", progress=False)
    assert _large(fake_hub) == []


def test_an_unreachable_hub_is_a_connection_error(hub_env, monkeypatch):
    with FakeHub() as hub:
        url = hub.url  # a port that was just closed: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(HubConnectionError, match=f"cannot reach the Hugging Face hub at {url}"):
        resolve_pipeline(REPO, progress=False)


def test_offline_with_an_empty_cache(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE=1 .* lacks the configs"):
        resolve_pipeline(REPO, progress=False)
    assert fake_hub.requests == []


def test_offline_with_a_complete_cache_works_and_an_incomplete_one_names_the_file(fake_hub, monkeypatch, hub_env):
    online = resolve_pipeline(REPO, progress=False)
    fake_hub.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = resolve_pipeline(REPO, progress=False)
    assert fake_hub.requests == [] and offline.revision == online.revision
    assert offline.transformer == online.transformer
    shard = online.text_encoder / "model-00001-of-00002.safetensors"
    shard.resolve().unlink()  # the blob and its link: as if that download had never finished
    shard.unlink()
    with pytest.raises(HubOfflineError, match="text_encoder/model-00001-of-00002.safetensors"):
        resolve_pipeline(REPO, progress=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    resolve_pipeline(REPO, progress=False)  # online again: just that file
    assert fake_hub.downloads() == ["text_encoder/model-00001-of-00002.safetensors"]


def test_not_enough_disk_space_is_refused_before_any_large_file(fake_hub, monkeypatch):
    monkeypatch.setattr(hub_fetch, "free_bytes", lambda folder: 5_000_000)
    with pytest.raises(DiskSpaceError, match=r"fetches 9\.\d\d MB .* has 5\.00 MB free") as info:
        resolve_pipeline(REPO, progress=False)
    assert isinstance(info.value, Krea2LiteError) and _large(fake_hub) == []


def test_an_interrupted_download_resumes(fake_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # written to disk as it arrives
    shard = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    fake_hub.cut_after[shard] = 1_000_000  # the connection breaks after 1 MB
    spec = resolve_pipeline(REPO, progress=False)
    gets = [r for r in fake_hub.requests if r.method == "GET" and r.file == shard]
    assert len(gets) == 2 and gets[0].range is None
    resumed_at = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))  # the second asks only for the rest
    assert 0 < resumed_at <= 1_000_000
    served = fake_hub.repos[REPO].commits[fake_hub.commit] / shard
    assert (spec.transformer / served.name).read_bytes() == served.read_bytes()


def test_a_pickle_named_on_the_hub_is_refused_before_fetching(fake_hub):
    from krea2_lite.errors import UnsafeCheckpointFormatError

    hub = hub_fetch.HubFetcher(progress=False)
    root = hub.resolve(REPO)
    with pytest.raises(UnsafeCheckpointFormatError, match="pickle"):
        hub.need(root / "transformer" / "diffusion_pytorch_model.bin")
    assert _large(fake_hub) == []
