"""A small fake Hub on 127.0.0.1 for the push and download tests: it speaks the part of the Hub's HTTP API that
`HfApi.create_repo`, `create_branch` and `create_commit` use (push), and that `snapshot_download` uses (the
revision endpoint, the recursive tree listing and HEAD/GET on resolve URLs), so what was sent and what was fetched
can be checked. Uploads need `Bearer TOKEN`; downloads of these public repos need no token."""

import base64
import hashlib
import json
import os
import re
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

TOKEN = "hf_tinybertTestToken" + "5b1f0c9e2d7a"  # unmistakable in any file or output it might leak into
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"  # owner/name, or a legacy id without an owner (bert-base-uncased)


def commit_of(files: dict[str, bytes]) -> str:
    """A branch's commit id: a hash of its files, so the same files always read as the same commit."""
    return hashlib.sha1(json.dumps(sorted((p, hashlib.sha1(b).hexdigest()) for p, b in files.items())).encode()
                        ).hexdigest()


class FakeHub(ThreadingHTTPServer):
    """Repos in memory: {repo_id: {"spec": ..., "branches": {name: {path: bytes}}, "commits": [...],
    "snapshots": {commit: {path: bytes}}}}; a branch's commit is `commit_of` its files, and `snapshots` keeps the
    commits that `add_model` replaced, so an old commit stays downloadable.

    Routes: POST /api/repos/create, /api/models/{repo}/branch/{b}, /api/models/{repo}/preupload/{rev} (every file
    "regular", so content travels base64 in the commit and no LFS/xet upload happens), /api/models/{repo}/commit/{rev}
    (NDJSON: header, then file lines), /api/validate-yaml; GET /api/models/{repo}/revision/{rev},
    /api/models/{repo}/tree/{rev}, HEAD and GET /{repo}/resolve/{rev}/{path}. POSTs without `Bearer TOKEN` get 401;
    anything else is recorded in `unknown` and answered 404. `requests` records every request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos, self.requests, self.unknown = {}, [], []
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"

    def add_model(self, repo_id: str, folder: Path, branch: str = "main", extra: dict[str, bytes] = None) -> str:
        """Publish the files of `folder` (plus `extra`) as the new head of `branch`; returns the commit id."""
        repo = self.repos.setdefault(repo_id, {"spec": {}, "branches": {}, "commits": [], "snapshots": {}})
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
        files.update(extra or {})
        commit = commit_of(files)
        repo["branches"][branch] = files
        repo.setdefault("snapshots", {})[commit] = files
        return commit

    def downloads(self, repo_id: str) -> list[str]:
        """The paths in `repo_id` whose bytes were fetched (GET on a resolve URL)."""
        return [m.group("path") for method, path, _, _ in self.requests if method == "GET"
                and (m := re.fullmatch(_REPO + r"/resolve/[^/]+/(?P<path>.+)", urlparse(path).path[1:]))
                and m.group("repo") == repo_id]


@contextmanager
def running():
    """A FakeHub serving on a thread for the duration of the block."""
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def online_env(home: Path, **extra: str) -> dict:
    """The environment of a user who is online with a token in HF_TOKEN and `home` as Hugging Face home."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN_PATH", "TINYBERT_TRACEBACK",
                        "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    return {**env, "HF_TOKEN": TOKEN, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: an unreachable endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send(self, status: int, payload, headers: dict = None, *, raw: bytes = None, body: bool = True):
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _record(self, method: str, body: bytes = b""):
        self.server.requests.append((method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))

    def _revision(self, repo_id: str, revision: str):
        """(commit, files) of a branch name or commit id of `repo_id`, or the 404 answer's (payload, headers)."""
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return None, ({"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        for name, files in repo["branches"].items():
            if revision in (name, commit_of(files)):
                return (commit_of(files), files), None
        if revision in repo.get("snapshots", {}):
            return (revision, repo["snapshots"][revision]), None
        return None, ({"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})

    def do_HEAD(self):
        self._record("HEAD")
        self._download(body=False)

    def do_GET(self):
        self._body()
        self._record("GET")
        path = urlparse(self.path).path
        if m := re.fullmatch(r"/api/models/" + _REPO + r"/(?P<kind>revision|tree)/(?P<rev>[^/]+)", path):
            found, missing = self._revision(m.group("repo"), unquote(m.group("rev")))
            if missing:
                return self._send(404, *missing)
            commit, files = found
            if m.group("kind") == "tree":
                return self._send(200, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                        for p, b in sorted(files.items())])
            return self._send(200, {"id": m.group("repo"), "sha": commit, "private": False,
                                    "siblings": [{"rfilename": p} for p in sorted(files)]})
        self._download(body=True)

    def _download(self, body: bool):
        m = re.fullmatch("/" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", urlparse(self.path).path)
        if not m:
            self.server.unknown.append((self.command, self.path))
            return self._send(404, {"error": "not implemented by the fake hub"}, body=body)
        found, missing = self._revision(m.group("repo"), unquote(m.group("rev")))
        if missing:
            return self._send(404, *missing, body=body)
        commit, files = found
        data = files.get(unquote(m.group("path")))
        if data is None:
            return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, body=body)
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        return self._send(200, None, {"X-Repo-Commit": commit, "ETag": etag}, raw=data, body=body)

    def do_POST(self):
        body = self._body()
        path = urlparse(self.path).path
        self._record("POST", body)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        repos = self.server.repos
        if path == "/api/repos/create":
            spec = json.loads(body)
            repo_id = f"{spec['organization']}/{spec['name']}"
            if repo_id in repos:
                return self._send(409, {"error": "You already created this model repo",
                                        "url": f"{self.server.endpoint}/{repo_id}"})
            repos[repo_id] = {"spec": spec, "branches": {"main": {}}, "commits": []}
            return self._send(200, {"url": f"{self.server.endpoint}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if not m:
            self.server.unknown.append(("POST", self.path))
            return self._send(404, {"error": "not implemented by the fake hub"})
        return self._change(m.group(1), m.group(2), unquote(m.group(3)), body)

    def _change(self, repo_id: str, action: str, revision: str, body: bytes):
        """branch, preupload and commit: what push sends."""
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if action == "branch":
            if revision in repo["branches"]:
                return self._send(409, {"error": "Reference already exists"})
            repo["branches"][revision] = dict(repo["branches"]["main"])
            return self._send(200, {})
        if revision not in repo["branches"]:
            return self._send(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        for line in lines:
            if line["key"] == "file":
                repo["branches"][revision][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                return self._send(400, {"error": f"the fake hub takes regular files only, not {line['key']}"})
        oid = hashlib.sha1(body).hexdigest()
        repo["commits"].append({"revision": revision, "oid": oid, **header})
        return self._send(200, {"commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                                "success": True})
