"""Model cards and `tinybert push`, against a small fake Hub on 127.0.0.1 that speaks the part of the Hub's HTTP API
`HfApi.create_repo`, `create_branch` and `upload_folder` use: we check what arrived there, and that the token
appears nowhere but in the Authorization header."""

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from tinybert.hub import load_model, load_tokenizer, save_model
from tinybert.model import Bert, BertConfig
from tinybert.publish import PushError, model_card, push

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TOKEN = "hf_tinybertTestToken" + "5b1f0c9e2d7a"  # unmistakable in any file or output it might leak into
TEACHER = "textattack/bert-base-uncased-SST-2"


# ---------------------------------------------------------------------------------------------------- fake Hub


class FakeHub(ThreadingHTTPServer):
    """Repos in memory: {repo_id: {"visibility": ..., "branches": {name: {path: bytes}}, "commits": [...]}}.

    Routes: POST /api/repos/create, /api/models/{repo}/branch/{b}, /api/models/{repo}/preupload/{rev} (every file
    "regular", so content travels base64 in the commit and no LFS/xet upload happens), /api/models/{repo}/commit/{rev}
    (NDJSON: header, then file lines), /api/validate-yaml. Requests without `Bearer TOKEN` get 401; anything else
    is recorded in `unknown` and answered 404."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos, self.requests, self.unknown = {}, [], []
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


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

    def _send(self, status: int, payload: dict, headers: dict = None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._body()
        self.server.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, b""))
        self.server.unknown.append(("GET", self.path))
        self._send(404, {"error": "not implemented by the fake hub"})

    def do_POST(self):
        body = self._body()
        path = urlparse(self.path).path
        self.server.requests.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body))
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
        repo_id, action, revision = m.group(1), m.group(2), unquote(m.group(3))
        repo = repos.get(repo_id)
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


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------------- a model


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm_dir) -> Path:
    """A task-distillation run directory as the training loop leaves it: recipe.yaml, log.jsonl, metrics.json and
    the exported student (a tiny classifier with the MiniLM tokenizer) in RUN/student; plus a bench JSON."""
    run = tmp_path_factory.mktemp("runs") / "tinybert-sst2"
    tokenizer = load_tokenizer(minilm_dir)
    config = BertConfig.preset("tinybert-4l-312d", vocab_size=len(tokenizer), num_labels=2,
                               id2label={0: "negative", 1: "positive"}, problem_type="single_label_classification",
                               **SMALL)
    torch.manual_seed(0)
    save_model(Bert(config), run / "student", tokenizer)
    recipe = {"recipe": "task", "seed": 42, "max_seq_length": 64, "batch_size": 32, "learning_rate": 5e-5,
              "scheduler": "linear", "warmup_ratio": 0.1, "precision": "bf16", "layer_map": [0, 6, 12],
              "terms": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "prediction": 1.0},
              "attention_mode": "masked", "shared_projection": False, "prediction": "soft", "temperature": 2.0,
              "soft_mode": "original", "teacher": TEACHER, "student": "runs/general/student", "task": "sst2",
              "augment": "runs/sst2-augmented.tsv"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    records = []
    for step in range(1, 7):
        records.append({"stage": "stage1", "kind": "train", "step": step, "epoch": 0, "loss": 30.0 - step,
                        "embedding": 0.5, "hidden": 2.0, "attention": 27.5 - step, "lr": 5e-5, "grad_norm": 1.0,
                        "tokens_per_s": 1000.0})
    for step in range(1, 5):
        records.append({"stage": "stage2", "kind": "train", "step": step, "epoch": 0, "loss": 0.7 - 0.1 * step,
                        "prediction": 0.7 - 0.1 * step, "lr": 3e-5, "grad_norm": 0.5, "tokens_per_s": 2000.0})
    records.append({"stage": "stage2", "kind": "eval", "step": 4, "epoch": 0, "accuracy": 0.8875, "loss": 0.31})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "metrics.json").write_text(json.dumps({"task": "sst2", "split": "validation",
                                                  "metrics": {"accuracy": 0.8875}}))
    (run / "bench.json").write_text(json.dumps({
        "model": {"name": "tinybert-sst2", "p50_ms": 2.5, "p95_ms": 3.1, "throughput": 900.0},
        "vs": {"name": TEACHER, "p50_ms": 23.0, "p95_ms": 25.0, "throughput": 95.0, "params": 109_483_778},
        "speedup": 9.2, "device": "cpu", "batch_size": 1, "seq_len": 128}))
    return run


def _snapshot(*directories: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for d in directories for p in sorted(d.rglob("*"))}


def _files_containing(directory: Path, text: str) -> list[str]:
    return [str(p) for p in directory.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def tinybert(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinybert.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture
def online_env(tmp_path) -> dict:
    """The environment of a user who pushes: online, a token in HF_TOKEN, an empty Hugging Face home."""
    home = tmp_path / "hf-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN_PATH", "TINYBERT_TRACEBACK")}
    return {**env, "HF_TOKEN": TOKEN, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------------- the card


def test_model_card_metadata_carries_the_runs_figures(run):
    text = model_card(run / "student", bench=run / "bench.json")
    data = ModelCard(text).data
    assert data.license == "apache-2.0"
    assert data.base_model == TEACHER
    assert {"tinybert", "distillation", "bert", "text-classification"} <= set(data.tags)
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.datasets == ["nyu-mll/glue"] and data.metrics == ["accuracy"]
    assert data.model_name == "tinybert-sst2"
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_config, result.dataset_split) == (
        "text-classification", "nyu-mll/glue", "sst2", "validation")
    assert (result.metric_type, result.metric_value) == ("accuracy", 0.8875)

    body = text.split("\n---\n", 1)[1]
    for expected in ("Task distillation, stage 1", "Task distillation, stage 2", "`[0, 6, 12]`", "temperature 2",
                     "mode `masked`", "`runs/sst2-augmented.tsv`", "| SST-2 | validation | Accuracy | 0.8875 |",
                     "**9.20x**", "| 23 | 25 | 95 |", "AutoModelForSequenceClassification", TEACHER):
        assert expected in body, expected
    n = load_model(run / "student").num_parameters()["total"]
    assert f"| this model | {n / 1e6:.1f}M | 2.5 | 3.1 | 900 |" in body
    assert f"{109_483_778 / n:.1f}x fewer parameters than the teacher" in body


def test_model_card_usage_snippet_runs_on_the_exported_files(run):
    """The card's Python block, pointed at the local directory, loads the model with plain transformers."""
    text = model_card(run / "student", repo_id="me/tinybert-sst2")
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert 'from_pretrained("me/tinybert-sst2")' in snippet
    printed = subprocess.run([sys.executable, "-c", snippet.replace("me/tinybert-sst2", str(run / "student"))],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() in ("['negative']", "['positive']")


def test_model_card_bare_student_local_teacher_and_license(tmp_path, minilm_dir):
    tokenizer = load_tokenizer(minilm_dir)
    save_model(Bert(BertConfig(vocab_size=len(tokenizer), **SMALL)), tmp_path / "general" / "student", tokenizer)
    (tmp_path / "general" / "recipe.yaml").write_text(yaml.safe_dump(
        {"recipe": "general", "teacher": str(minilm_dir), "corpus": ["wikitext", "books/"], "layer_map": "uniform",
         "terms": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0}}))
    text = model_card(tmp_path / "general" / "student", license="mit")
    data = ModelCard(text).data
    assert data.license == "mit" and data.base_model is None  # a local path is no Hub id
    assert "text-classification" not in data.tags and data.pipeline_tag == "feature-extraction"
    assert data.eval_results is None and "model-index" not in text
    assert "AutoModel.from_pretrained" in text and "General distillation" in text and "`wikitext`" in text
    named = ModelCard(model_card(tmp_path / "general" / "student", base_model="sentence-transformers/all-MiniLM-L6-v2"))
    assert named.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"


# ---------------------------------------------------------------------------------------------------- push


def test_push_cli_uploads_model_and_card_and_never_leaks_the_token(run, hub, online_env, tmp_path):
    before = _snapshot(run)
    result = tinybert("push", run / "student", "--repo-id", "me/tinybert-sst2", "--endpoint", hub.endpoint,
                      "--private", "--revision", "exp", "--commit-message", "first student",
                      "--bench", run / "bench.json", env=online_env)
    assert result.returncode == 0, result.stderr
    assert "me/tinybert-sst2" in result.stdout and "branch exp" in result.stdout

    repo = hub.repos["me/tinybert-sst2"]
    assert repo["spec"]["visibility"] == "private"
    assert [c["summary"] for c in repo["commits"]] == ["first student"]
    files = repo["branches"]["exp"]
    assert repo["branches"]["main"] == {}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    for name in files:
        if name != "README.md":
            assert files[name] == (run / "student" / name).read_bytes(), name
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == TEACHER and card.data.eval_results[0].metric_value == 0.8875
    assert "**9.20x**" in card.text and "`[0, 6, 12]`" in card.text
    assert 'from_pretrained("me/tinybert-sst2")' in card.text
    assert not hub.unknown

    # The token went in the Authorization header of every request, and nowhere else.
    assert hub.requests and all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h, _ in hub.requests)
    assert TOKEN not in result.stdout + result.stderr
    assert not [n for n, data in files.items() if TOKEN.encode() in data]
    assert not [b for _, _, _, b in hub.requests if TOKEN.encode() in b]
    assert not _files_containing(tmp_path, TOKEN) and not _files_containing(run, TOKEN)
    assert _snapshot(run) == before  # the local directory is not written to


def test_push_api_to_an_existing_repo_on_main(run, hub, monkeypatch):
    """`push()` in-process with an explicit token: create_repo on an existing repo is fine (exist_ok)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.repos["me/again"] = {"spec": {}, "branches": {"main": {"old.txt": b"old"}}, "commits": []}
    url = push(run / "student", "me/again", token=TOKEN, endpoint=hub.endpoint)
    assert url.startswith(f"{hub.endpoint}/me/again/commit/")
    files = hub.repos["me/again"]["branches"]["main"]
    assert {"old.txt", "model.safetensors", "README.md"} <= set(files)
    assert hub.repos["me/again"]["commits"][0]["summary"] == "Upload student with tinybert"


def _one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and TOKEN not in result.stdout + result.stderr
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["not-a-model", "bad-repo-id", "no-token", "unreachable"])
def test_push_refuses_with_one_line_and_leaves_files_untouched(case, run, hub, online_env, tmp_path):
    model, repo_id, endpoint, env = run / "student", "me/tinybert-sst2", hub.endpoint, online_env
    expected = {"not-a-model": "is not an exported model", "bad-repo-id": "repo id 'me/bad name!' is not valid",
                "no-token": "no Hugging Face token", "unreachable": "cannot reach http://127.0.0.1:"}[case]
    if case == "not-a-model":
        model = tmp_path / "notes"
        model.mkdir()
        (model / "notes.txt").write_text("not a model")
    elif case == "bad-repo-id":
        repo_id = "me/bad name!"
    elif case == "no-token":
        env = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    else:
        endpoint = f"http://127.0.0.1:{_closed_port()}"
    before = _snapshot(run, tmp_path)
    result = tinybert("push", model, "--repo-id", repo_id, "--endpoint", endpoint, env=env)
    line = _one_line_error(result)
    assert expected in line, line
    if case == "unreachable":
        assert endpoint in line
    assert _snapshot(run, tmp_path) == before
    assert not hub.repos  # nothing reached the hub
