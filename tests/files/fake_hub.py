"""A fake Hugging Face hub for tests: a loopback HTTP server that speaks the endpoints the real
huggingface_hub client uses for `snapshot_download` / `hf_hub_download`, so the real client runs
against it through HF_ENDPOINT.

  GET  /api/models/{repo}/revision/{rev}          {"id", "sha", "siblings"}   (repo_info)
  GET  /api/models/{repo}/tree/{rev}?recursive=1  [{type, path, size, oid, lfs}] (list_repo_tree)
  HEAD /{repo}/resolve/{rev}/{path}                X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{path}                the bytes (Range: bytes=N- answered with 206)

Errors carry huggingface_hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo: 401 without a token, 403 with a token that has no access). Every request is logged
(`requests`). It listens on 127.0.0.1 only, and stops itself after `lifetime_s` at the latest.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, Path]                       # commit hash → folder of files at that commit
    branches: dict[str, str]                       # "main" → commit hash
    gated: bool = False


def commit_of(folder: Path, salt: str = "") -> str:
    digest = hashlib.sha1(salt.encode())
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f.relative_to(folder).as_posix().encode() + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


@dataclass
class Request:
    method: str
    path: str                                      # the URL path, unquoted
    range: str | None
    token: str | None

    @property
    def file(self) -> str | None:
        """The repo file a resolve request asks for (None for API calls)."""
        parts = self.path.split("/resolve/", 1)
        return parts[1].split("/", 1)[1] if len(parts) == 2 else None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    tokens_with_access: set[str] = field(default_factory=set)
    cut_after: dict[str, int] = field(default_factory=dict)  # file → bytes sent before the first GET breaks
    requests: list[Request] = field(default_factory=list)
    lifetime_s: float = 300.0

    def add(self, repo_id: str, folder: Path, *, branch: str = "main", gated: bool = False) -> str:
        """Serve `folder` as a new commit of `repo_id` (the head of `branch`); returns the commit hash."""
        commit = commit_of(folder, repo_id)
        repo = self.repos.setdefault(repo_id, Repo({}, {}))
        repo.commits[commit] = folder
        repo.branches[branch] = commit
        repo.gated = repo.gated or gated
        return commit

    # ---- what the tests look at ------------------------------------------------------------------
    def downloads(self) -> list[str]:
        """Files whose bytes were sent (GET of a resolve URL)."""
        return [r.file for r in self.requests if r.method == "GET" and r.file is not None]

    def clear(self) -> None:
        self.requests.clear()

    # ---- server ------------------------------------------------------------------------------------
    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    timeout = 20  # a stuck client cannot hold a server thread for long

    def log_message(self, *args) -> None:  # quiet: the request log is `fake.requests`
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _send(self, status: int, headers: dict, body: bytes = b"", send_body: bool = True) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
                   body, self.command != "HEAD")

    def _serve(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        auth = self.headers.get("Authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        self.fake.requests.append(Request(self.command, path, self.headers.get("Range"), token))
        api = path.startswith("/api/models/")
        parts = path[len("/api/models/"):].split("/", 4) if api else path.lstrip("/").split("/", 4)
        if len(parts) < 4:
            return self._error(404, "RepoNotFound", "not found")
        repo_id, kind, revision = "/".join(parts[:2]), parts[2], parts[3]
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return self._error(401 if token is None else 404, "RepoNotFound", f"Repository Not Found for {repo_id}")
        if repo.gated and token not in self.fake.tokens_with_access:
            status = 401 if token is None else 403
            return self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted")
        commit = repo.branches.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Revision Not Found: {revision}")
        folder = repo.commits[commit]
        rest = parts[4] if len(parts) > 4 else ""
        if api and kind == "revision":
            return self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                               "gated": "manual" if repo.gated else False,
                               "siblings": [{"rfilename": f} for f in _files(folder)]})
        if api and kind == "tree":
            return self._json(_tree(folder, rest))
        if not api and kind == "resolve":
            return self._file(folder, commit, rest, body)
        return self._error(404, "EntryNotFound", f"unknown endpoint {path}")

    def _json(self, value) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(value).encode(), self.command != "HEAD")

    def _file(self, folder: Path, commit: str, rel: str, body: bool) -> None:
        file = folder / rel
        if not rel or not file.is_file():
            return self._error(404, "EntryNotFound", f"{rel} does not exist at {commit}")
        data = file.read_bytes()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_oid(data, rel)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = 0
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and range_header.endswith("-"):
            start = int(range_header[len("bytes="):-1])
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not body:
            return self._send(status, headers, data[start:], send_body=False)
        cut = self.fake.cut_after.pop(rel, None)
        if cut is None:
            return self._send(status, headers, data[start:])
        self.send_response(status)  # a connection that breaks after `cut` bytes (an interrupted download)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:start + cut])
        self.wfile.flush()
        self.close_connection = True


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _oid(data: bytes, rel: str) -> str:
    """A safetensors file is an LFS file (its ETag is the sha256); others have a git blob id."""
    if rel.endswith((".safetensors", ".bin", ".png", ".pdf")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tree(folder: Path, under: str) -> list[dict]:
    entries, folders = [], set()
    for rel in _files(folder):
        if under and not rel.startswith(under.rstrip("/") + "/"):
            continue
        data = (folder / rel).read_bytes()
        entry = {"type": "file", "path": rel, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if rel.endswith((".safetensors", ".bin", ".png", ".pdf")):
            entry["lfs"] = {"oid": _oid(data, rel), "size": len(data), "pointerSize": 134}
        entries.append(entry)
        parent = rel.rsplit("/", 1)[0] if "/" in rel else None
        while parent and parent not in folders:
            folders.add(parent)
            parent = parent.rsplit("/", 1)[0] if "/" in parent else None
    return [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(folders)] + entries
