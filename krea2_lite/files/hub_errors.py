"""huggingface_hub's exceptions → one typed krea2_lite error each, one line that says what to do."""

from __future__ import annotations

from ..errors import HubAccessError, HubConnectionError, HubNotFoundError, HubOfflineError


def _page(endpoint: str, repo_id: str) -> str:
    return f"{endpoint}/{repo_id}"


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _has_token() -> bool:
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # an unreadable token file counts as no token
        return False


def gated_error(repo_id: str, endpoint: str, status: int | None) -> HubAccessError:
    """401 (no token sent) → not logged in; 403 (a token without access) → not approved yet."""
    not_logged_in = status == 401 or (status is None and not _has_token())
    if not_logged_in:
        return HubAccessError(
            f"{repo_id} is a gated repo and this machine is not logged in to the Hugging Face hub: accept the "
            f"license on {_page(endpoint, repo_id)}, then run `hf auth login` (or set HF_TOKEN) and retry",
            reason="not-logged-in")
    return HubAccessError(
        f"{repo_id} is a gated repo and the account of your token has no access to it yet: accept the license on "
        f"{_page(endpoint, repo_id)} with that account (approval can take a moment), then retry",
        reason="not-approved")


def offline_error(repo_id: str, revision: str | None, detail: str, cache: str) -> HubOfflineError:
    return HubOfflineError(
        f"HF_HUB_OFFLINE=1 and the Hugging Face hub cache {cache} lacks {detail} of {repo_id}"
        f"{'@' + revision if revision else ''} that this load reads; run once with network access "
        "(or unset HF_HUB_OFFLINE)")


def translate(exc: BaseException, repo_id: str, revision: str | None, *, endpoint: str, offline: bool,
              cache: str, what: str | None = None) -> BaseException:
    """The krea2_lite error for an exception raised by huggingface_hub (or `exc` itself if none fits)."""
    from huggingface_hub import errors as hub

    named = f"'{repo_id}{'@' + revision if revision else ''}{'/' + what if what else ''}'"
    if isinstance(exc, hub.GatedRepoError):
        return gated_error(repo_id, endpoint, _status(exc))
    if isinstance(exc, hub.RevisionNotFoundError):
        return HubNotFoundError(f"{named}: the hub repo {repo_id} has no revision '{revision}' (a branch, tag or "
                                "commit hash)")
    if isinstance(exc, hub.RemoteEntryNotFoundError):
        return HubNotFoundError(f"{named}: the hub repo {repo_id} has no file {what or ''}".rstrip())
    if isinstance(exc, hub.RepositoryNotFoundError):
        return HubNotFoundError(
            f"{named} is not a local path, and {endpoint} has no repository {repo_id} (if it is private, log in "
            "with `hf auth login` or set HF_TOKEN)")
    if isinstance(exc, hub.LocalEntryNotFoundError) or isinstance(exc, hub.OfflineModeIsEnabled):
        if offline:
            return offline_error(repo_id, revision, "the configs and indexes", cache)
        return HubConnectionError(f"{named}: cannot reach the Hugging Face hub at {endpoint}, and the cache {cache} "
                                  "does not hold what this load reads; check the network connection (or proxy), "
                                  "then retry")
    if isinstance(exc, hub.HfHubHTTPError):
        return HubConnectionError(f"{named}: the Hugging Face hub at {endpoint} answered HTTP {_status(exc)}; "
                                  "retry later")
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.split(".")[0] in ("httpx", "httpx2",
                                                                                                   "httpcore"):
        return HubConnectionError(f"{named}: the download from {endpoint} failed ({type(exc).__name__}: "
                                  f"{str(exc)[:120]}); rerun to resume it")
    return exc
