"""Model cards and `tinybert push`, against the small fake Hub on 127.0.0.1 of tests/fakehub.py: we check what
arrived there, and that the token appears nowhere but in the Authorization header."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from fakehub import TOKEN, closed_port, running  # tests/fakehub.py
from fakehub import online_env as fakehub_env
from tinybert.bench import benchmark, compare, machine
from tinybert.checkpoint import load_model, load_tokenizer, save_model
from tinybert.model import Bert, BertConfig
from tinybert.publish import PushError, model_card, push, read_bench
from tinybert.rundir import Bench

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TEACHER = "textattack/bert-base-uncased-SST-2"


@pytest.fixture
def hub():
    with running() as server:
        yield server


# ---------------------------------------------------------------------------------------------------- a model


def _log(path: Path, records: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def run(module_tmp, minilm_dir) -> Path:
    """Run directories laid out as tinybert's commands leave them, with tiny models and the MiniLM tokenizer:
    runs/general (general distillation: recipe.yaml, log.jsonl, student/) and runs/tinybert-sst2 (task distillation
    from runs/general/student: recipe.yaml with one recipe per stage, stage1/log.jsonl, stage1/student/,
    stage2/log.jsonl, best/, last/, metrics.json), plus a bench JSON. Returns the task run."""
    runs = module_tmp
    general, run = runs / "general", runs / "tinybert-sst2"
    tokenizer = load_tokenizer(minilm_dir)
    bare = BertConfig.preset("tinybert-4l-312d", vocab_size=len(tokenizer), **SMALL)
    torch.manual_seed(0)
    save_model(Bert(bare), general / "student", tokenizer)
    (general / "recipe.yaml").write_text(yaml.safe_dump(
        {"recipe": "general", "batch_size": 256, "max_seq_length": 128, "learning_rate": 5e-5, "layer_map": "uniform",
         "terms": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0}, "attention_mode": "masked",
         "teacher": "google-bert/bert-base-uncased", "student": None, "corpus": ["wikitext", "books/"]}))
    _log(general / "log.jsonl", [{"stage": "general", "kind": "train", "step": s, "epoch": 0, "loss": 9.0 / s,
                                  "embedding": 1.0 / s, "hidden": 4.0 / s, "attention": 4.0 / s, "lr": 5e-5}
                                 for s in range(1, 4)])

    head = bare.replace(num_labels=2, id2label={0: "negative", 1: "positive"},
                        problem_type="single_label_classification")
    save_model(Bert(bare), run / "stage1" / "student", tokenizer)
    torch.manual_seed(1)
    save_model(Bert(head), run / "best", tokenizer)
    save_model(Bert(head), run / "last", tokenizer)
    stage = {"recipe": "task", "seed": 42, "max_seq_length": 64, "batch_size": 32, "learning_rate": 5e-5,
             "scheduler": "linear", "warmup_ratio": 0.1, "precision": "bf16", "layer_map": [0, 6, 12],
             "attention_mode": "masked", "shared_projection": False, "temperature": 1.0, "soft_mode": "original"}
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "stage1": {**stage, "terms": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "prediction": 0.0}},
        "stage2": {**stage, "learning_rate": 3e-5, "temperature": 2.0, "prediction": "soft",
                   "terms": {"embedding": 0.0, "hidden": 0.0, "attention": 0.0, "prediction": 1.0}},
        "teacher": TEACHER, "student": str(general / "student"), "task": "sst2",
        "augmented": "runs/sst2-augmented.tsv"}, sort_keys=False))
    _log(run / "stage1" / "log.jsonl",
         [{"stage": "stage1", "kind": "train", "step": s, "epoch": 0, "loss": 30.0 - s, "embedding": 0.5,
           "hidden": 2.0, "attention": 27.5 - s, "lr": 5e-5, "grad_norm": 1.0, "tokens_per_s": 1000.0}
          for s in range(1, 7)])
    evals = [{"stage": "stage2", "step": 2, "accuracy": 0.8875}, {"stage": "stage2", "step": 4, "accuracy": 0.875}]
    _log(run / "stage2" / "log.jsonl",
         [{"stage": "stage2", "kind": "teacher_logits", "step": 0, "rows": 64, "seconds": 1.0}]
         + [{"stage": "stage2", "kind": "train", "step": s, "epoch": 0, "loss": 0.7 - 0.1 * s,
             "prediction": 0.7 - 0.1 * s, "lr": 3e-5, "grad_norm": 0.5, "tokens_per_s": 2000.0} for s in range(1, 5)]
         + [{"kind": "eval", "epoch": 0, **e} for e in evals])
    (run / "metrics.json").write_text(json.dumps({"task": "sst2", "main_metric": "accuracy", "best": evals[0],
                                                  "last": evals[1], "history": evals}))
    # The speed figures as `tinybert bench MODEL --vs TEACHER` writes them (a small stand-in teacher).
    torch.manual_seed(2)
    save_model(Bert(BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=256)), runs / "teacher", tokenizer)
    quick = dict(seq_len=16, throughput_batch=4, latency_repeats=3, throughput_repeats=1)
    model, vs = benchmark(run / "best", **quick), benchmark(runs / "teacher", **quick)
    Bench(model, vs, compare(model, vs), machine()).write(run / "bench.json")  # as run_bench writes it
    return run


@pytest.fixture(scope="module")
def onnx_export(run, module_tmp) -> Path:
    """`tinybert export` of run/best with int8 into a folder of its own (int8 is scored on SST-2 dev, the run's task,
    when the GLUE files are here), and its ONNX Runtime figures as `tinybert bench --engine onnxruntime` writes them
    (tiny sizes: only their place in the card is tested)."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[onnx]'")
    from tinybert.bench import run_bench
    from tinybert.onnx_export import export_onnx

    output = module_tmp / "best-onnx"
    export_onnx(run / "best", output, quantize="int8", echo=lambda _: None)
    run_bench(str(output), None, "cpu", "fp32", None, echo=lambda _: None, engine="onnxruntime", seq_len=16,
              throughput_batch=4, latency_repeats=3, throughput_repeats=1)
    return output


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
    return fakehub_env(tmp_path / "hf-home")


# ---------------------------------------------------------------------------------------------------- the card


def test_model_card_metadata_carries_the_runs_figures(run):
    text = model_card(run / "best", bench=run / "bench.json")
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
    # Lineage: the general run behind the task run's student, then both task stages, each with its own recipe.
    general, stage1, stage2 = (body.index(f"### {title}") for title in (
        "General distillation", "Task distillation, stage 1", "Task distillation, stage 2"))
    assert general < stage1 < stage2 < body.index("## Evaluation")
    assert "[`google-bert/bert-base-uncased`]" in body[general:stage1] and "`wikitext`" in body[general:stage1]
    assert "loss terms (weight): embedding 1, hidden 1, attention 1\n" in body[stage1:stage2]
    assert "`[0, 6, 12]`" in body[stage1:stage2] and "learning rate 5e-05" in body[stage1:stage2]
    assert "loss terms (weight): prediction 1\n" in body[stage2:] and "temperature 2," in body[stage2:]
    assert "learning rate 3e-05" in body[stage2:] and "last held-out evaluation (step 4): accuracy 0.875" in body
    for expected in ("mode `masked`", "augmented: `runs/sst2-augmented.tsv`", "Scores of the best checkpoint "
                     "(stage2 step 2)", "| SST-2 | validation | Accuracy | 0.8875 |", "AutoModelForSequenceClassification",
                     TEACHER, "Measured with `tinybert bench`: device cpu"):
        assert expected in body, expected
    last = ModelCard(model_card(run / "last")).data.eval_results[0]  # last/ is scored by metrics.json's "last"
    assert last.metric_value == 0.875
    bench = json.loads((run / "bench.json").read_text())
    model, vs, speedup = bench["model"], bench["vs"], bench["speedup"]
    n = load_model(run / "best").num_parameters()["total"]
    assert (f"| this model | {n / 1e6:.1f}M | {model['latency_ms_p50']:.4g} | {model['latency_ms_p95']:.4g} | "
            f"{model['throughput_seq_per_s']:.4g} |") in body
    assert f"| {vs['latency_ms_p50']:.4g} | {vs['latency_ms_p95']:.4g} | {vs['throughput_seq_per_s']:.4g} |" in body
    assert (f"**{speedup['latency_speedup']:.2f}x** lower p50 latency (batch 1), "
            f"**{speedup['throughput_speedup']:.2f}x** higher throughput") in body
    assert f"{vs['parameters'] / n:.1f}x fewer parameters than `{vs['model']}`" in body


def test_read_bench_takes_a_short_hand_written_form():
    bench = read_bench({"model": {"p50_ms": 2.5, "throughput": 900}, "vs": {"p50_ms": 23.0, "throughput": 90},
                        "speedup": 9.2, "device": "cpu"})
    assert bench["speedup"] == {"latency": 9.2, "throughput": 10.0}
    assert bench["model"]["p50"] == 2.5 and bench["setting"] == {"device": "cpu"}
    with pytest.raises(ValueError, match="mapping with 'model'"):
        read_bench({"speedup": 2})


def test_model_card_usage_snippet_runs_on_the_exported_files(run):
    """The card's Python block, pointed at the local directory, loads the model with plain transformers."""
    text = model_card(run / "best", repo_id="me/tinybert-sst2")
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert 'from_pretrained("me/tinybert-sst2")' in snippet
    printed = subprocess.run([sys.executable, "-c", snippet.replace("me/tinybert-sst2", str(run / "best"))],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() in ("['negative']", "['positive']")


def test_model_card_bare_student_local_teacher_and_license(run, tmp_path, minilm_dir):
    tokenizer = load_tokenizer(minilm_dir)
    save_model(Bert(BertConfig(vocab_size=len(tokenizer), **SMALL)), tmp_path / "general" / "student", tokenizer)
    (tmp_path / "general" / "recipe.yaml").write_text(yaml.safe_dump(
        {"recipe": "general", "teacher": str(minilm_dir), "corpus": ["wikitext", "books/"], "layer_map": "uniform",
         "terms": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0}}))
    shutil.copy(run / "bench.json", tmp_path / "general" / "student")  # where `tinybert bench MODEL` writes
    text = model_card(tmp_path / "general" / "student", license="mit")
    data = ModelCard(text).data
    assert data.license == "mit" and data.base_model is None  # a local path is no Hub id
    assert "text-classification" not in data.tags and data.pipeline_tag == "feature-extraction"
    assert data.eval_results is None and "model-index" not in text
    assert "AutoModel.from_pretrained" in text and "General distillation" in text and "`wikitext`" in text
    assert "`[0, 3, 6]`" in text  # `uniform`, resolved with the local 6-layer teacher
    assert "Measured with `tinybert bench`" in text and "lower p50 latency" in text
    named = ModelCard(model_card(tmp_path / "general" / "student", base_model="sentence-transformers/all-MiniLM-L6-v2"))
    assert named.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"


def test_model_card_lists_an_onnx_export_beside_the_model(run, onnx_export, tmp_path):
    """MODEL_DIR/onnx adds an ONNX section (figures from onnx_export.json and bench.json, a snippet that runs) and
    changes nothing else in the card."""
    model = tmp_path / "tinybert-sst2" / "best"
    shutil.copytree(run / "best", model)
    without = model_card(model, repo_id="me/tinybert-sst2")
    assert "## ONNX" not in without and "onnx" not in without.lower()
    shutil.copytree(onnx_export, model / "onnx")
    text = model_card(model, repo_id="me/tinybert-sst2")
    section = text[text.index("\n\n## ONNX\n"):text.index("\n\n## Citation")]
    assert text.replace(section, "", 1) == without  # the rest of the card is byte for byte the same

    record = json.loads((onnx_export / "onnx_export.json").read_text())
    bench = json.loads((onnx_export / "bench.json").read_text())
    assert f"opset {record['opset']}" in section and "output `logits`" in section
    assert f"differs from PyTorch by at most **{record['parity']['max_abs_diff']:.1e}**" in section
    assert f"over {record['parity']['checked_on']}; the export requires 1e-04 or less" in section
    size = (onnx_export / "model_quantized.onnx").stat().st_size / 2**20
    assert "| `onnx/model.onnx` | fp32 |" in section
    assert f"| `onnx/model_quantized.onnx` | int8 (dynamic quantisation) | {size:.1f} MB |" in section
    score = record["int8"]["eval"]
    if score:  # the GLUE files are here: the int8 line carries the export's SST-2 dev figures
        assert (f"- int8: SST-2 dev accuracy {score['int8']:.4f} against {score['fp32']:.4f} for fp32 "
                f"({score['examples']} rows; {score['agreement']:.1%} of predictions unchanged).") in section
    else:
        assert "- int8: not measured at export" in section
    for label, side in (("PyTorch fp32", "vs"), ("ONNX Runtime fp32", "model"), ("ONNX Runtime int8", "int8")):
        figures = bench[side]
        assert (f"| {label} | {figures['latency_ms_p50']:.2f} | {figures['latency_ms_p95']:.2f} | "
                f"{figures['throughput_seq_per_s']:.0f} |") in section
    assert (f"threads {bench['model']['threads']}, sequence length 16, throughput batch 4, "
            f"onnxruntime {bench['machine']['onnxruntime']}") in section
    assert 'from_pretrained("me/tinybert-sst2", subfolder="onnx", file_name="model_quantized.onnx")' in section

    # The ONNX Runtime snippet runs as printed, with the Hub download replaced by the local copy of onnx/.
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)
    download = 'folder = snapshot_download("me/tinybert-sst2", allow_patterns=["onnx/*"]) + "/onnx"'
    assert download in snippet and 'ort.InferenceSession(f"{folder}/model_quantized.onnx")' in snippet
    code = snippet.replace(download, f"folder = {str(model / 'onnx')!r}") + "print(logits.shape)\n"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == "(1, 2)"


# ---------------------------------------------------------------------------------------------------- push


def test_push_cli_uploads_model_and_card_and_never_leaks_the_token(run, hub, online_env, tmp_path):
    before = _snapshot(run.parent)
    result = tinybert("push", run / "best", "--repo-id", "me/tinybert-sst2", "--endpoint", hub.endpoint,
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
            assert files[name] == (run / "best" / name).read_bytes(), name
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == TEACHER and card.data.eval_results[0].metric_value == 0.8875
    assert "lower p50 latency" in card.text and "`[0, 6, 12]`" in card.text
    assert 'from_pretrained("me/tinybert-sst2")' in card.text
    assert not hub.unknown

    # The token went in the Authorization header of every request, and nowhere else.
    assert hub.requests and all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h, _ in hub.requests)
    assert TOKEN not in result.stdout + result.stderr
    assert not [n for n, data in files.items() if TOKEN.encode() in data]
    assert not [b for _, _, _, b in hub.requests if TOKEN.encode() in b]
    assert not _files_containing(tmp_path, TOKEN) and not _files_containing(run, TOKEN)
    assert _snapshot(run.parent) == before  # the local directory is not written to


def test_push_with_onnx_uploads_the_export_in_the_same_commit(run, onnx_export, hub, online_env):
    before = _snapshot(run.parent)
    result = tinybert("push", run / "best", "--repo-id", "me/tinybert-sst2", "--endpoint", hub.endpoint,
                      "--with-onnx", onnx_export, env=online_env)
    assert result.returncode == 0, result.stderr
    repo = hub.repos["me/tinybert-sst2"]
    assert len(repo["commits"]) == 1  # model, card and export together
    files = repo["branches"]["main"]
    exported = sorted(p.name for p in onnx_export.iterdir() if p.is_file())
    assert {"model.onnx", "model_quantized.onnx", "onnx_export.json", "bench.json", "tokenizer.json"} <= set(exported)
    assert sorted(n[len("onnx/"):] for n in files if n.startswith("onnx/")) == exported
    for name in exported:
        assert files[f"onnx/{name}"] == (onnx_export / name).read_bytes(), name
    assert files["model.safetensors"] == (run / "best" / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    record = json.loads((onnx_export / "onnx_export.json").read_text())
    assert "## ONNX" in card and f"**{record['parity']['max_abs_diff']:.1e}**" in card
    assert 'snapshot_download("me/tinybert-sst2", allow_patterns=["onnx/*"])' in card
    assert not hub.unknown and _snapshot(run.parent) == before


def test_push_api_to_an_existing_repo_on_main(run, hub, monkeypatch):
    """`push()` in-process with an explicit token: create_repo on an existing repo is fine (exist_ok)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.repos["me/again"] = {"spec": {}, "branches": {"main": {"old.txt": b"old"}}, "commits": []}
    url = push(run / "best", "me/again", token=TOKEN, endpoint=hub.endpoint)
    assert url.startswith(f"{hub.endpoint}/me/again/commit/")
    files = hub.repos["me/again"]["branches"]["main"]
    assert {"old.txt", "model.safetensors", "README.md"} <= set(files)
    assert hub.repos["me/again"]["commits"][0]["summary"] == "Upload tinybert-sst2/best with tinybert"


def test_push_errors_hold_no_token(run, hub, monkeypatch):
    """A refused token and offline mode end in a PushError; the token the server refused is not in its message."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set"):
        push(run / "best", "me/x", token=TOKEN, endpoint=hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    wrong = "hf_wrongToken0123456789"
    with pytest.raises(PushError, match=r"refused to create the repository \(HTTP 401\): the token was refused") as e:
        push(run / "best", "me/x", token=wrong, endpoint=hub.endpoint)
    assert wrong not in str(e.value) and "\n" not in str(e.value)
    assert not hub.repos


def _one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and TOKEN not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["not-a-model", "bad-repo-id", "no-token", "unreachable", "symlink",
                                  "not-an-export"])
def test_push_refuses_with_one_line_and_leaves_files_untouched(case, run, hub, online_env, tmp_path):
    model, repo_id, endpoint, env, extra = run / "best", "me/tinybert-sst2", hub.endpoint, online_env, []
    expected = {"not-a-model": "is not an exported model", "bad-repo-id": "repo id 'me/bad name!' is not valid",
                "no-token": "no Hugging Face token", "unreachable": "cannot reach http://127.0.0.1:",
                "symlink": "secret.txt is a symbolic link; push uploads regular files only",
                "not-an-export": "stage1/student is not an ONNX export (it needs model.onnx, onnx_export.json"}[case]
    if case == "not-an-export":  # a model folder, but no ONNX export
        extra = ["--with-onnx", run / "stage1" / "student"]
    elif case == "not-a-model":
        model = tmp_path / "notes"
        model.mkdir()
        (model / "notes.txt").write_text("not a model")
    elif case == "bad-repo-id":
        repo_id = "me/bad name!"
    elif case == "symlink":  # a link in the model folder could carry a file from outside it to the hub
        model = tmp_path / "best"
        shutil.copytree(run / "best", model)
        (tmp_path / "private.txt").write_text("not for the hub")
        (model / "secret.txt").symlink_to(tmp_path / "private.txt")
    elif case == "no-token":
        env = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    else:
        endpoint = f"http://127.0.0.1:{closed_port()}"
    before = _snapshot(run.parent, tmp_path)
    result = tinybert("push", model, "--repo-id", repo_id, "--endpoint", endpoint, *extra, env=env)
    line = _one_line_error(result)
    assert expected in line, line
    if case == "unreachable":
        assert endpoint in line
    assert _snapshot(run.parent, tmp_path) == before
    assert not hub.repos  # nothing reached the hub
