"""Runs that cannot go right are refused before they start, in one `error:` line, touching no file outside their own
--output (tinybert/guards.py): an --output in or around an input, a file or an unwritable place as --output, a second
run on a locked --output, a --resume with other settings (a stale lock does not block it, and extending keys are
said), config and recipe values that cannot work, a student with the teacher's vocabulary size but other ids, a NaN
that comes from the teacher, and a push whose repo id or endpoint holds the token.

The commands run in this process through `tinybert.cli.main` (as tests/test_task.py does), with a tiny teacher and
student on the MiniLM tokenizer and the first lines of a real book; one short general run is shared."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinybert.checkpoint import load_tokenizer, save_model
from tinybert.guards import FINGERPRINT, LOCK
from tinybert.model import Bert, BertConfig

from launch import cli  # tests/launch.py

TEACHER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
STUDENT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
SMALL = ["batch_size=8", "max_seq_length=64", "heldout_fraction=0", "precision=fp32", "save_every=1"]
TOKEN = "hf_guardsTestToken" + "7c3e9a1b5d"


def error_line(code: int, err: str) -> str:
    """The one `error:` line of a refused command (exit 1, no traceback)."""
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(*directories: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for d in directories for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(module_tmp, minilm_dir, data_dir) -> dict[str, Path]:
    """inputs/teacher, inputs/student (MiniLM tokenizer), inputs/corpus.txt (400 lines of a real book)."""
    root = module_tmp / "inputs"
    tokenizer = load_tokenizer(minilm_dir)
    for name, shape, seed in (("teacher", TEACHER, 0), ("student", STUDENT, 1)):
        torch.manual_seed(seed)
        save_model(Bert(BertConfig(vocab_size=len(tokenizer), **shape)), root / name, tokenizer)
    book = data_dir / "corpus" / "gutenberg" / "pg46_a_christmas_carol.txt"
    if not book.is_file():
        pytest.skip(f"{book} not found")
    (root / "corpus.txt").write_text("\n".join(book.read_text().splitlines()[:400]) + "\n")
    return {"root": root, "teacher": root / "teacher", "student": root / "student", "corpus": root / "corpus.txt"}


def general(inputs, output, *extra, teacher=None, student=None, corpus=None):
    return cli("distill", "--recipe", "general", "--teacher", teacher or inputs["teacher"], "--student",
               student or inputs["student"], "--corpus", corpus or inputs["corpus"], "--output", output, *SMALL, *extra)


@pytest.fixture(scope="module")
def finished(inputs, module_tmp) -> Path:
    """A general run of one step, with its checkpoint and fingerprint."""
    output = module_tmp / "finished"
    code, _, err = general(inputs, output, "max_steps=1")
    assert code == 0, err
    assert (output / FINGERPRINT).is_file() and (output / "checkpoints" / "step-0000001").is_dir()
    assert not (output / LOCK).exists()  # released when the command ended
    return output


# ---------------------------------------------------------------------------------------------- --output's place


@pytest.mark.parametrize("where, expected", [
    (lambda i: i["teacher"], "is the teacher"),
    (lambda i: i["teacher"] / "run", "lies inside the teacher"),
    (lambda i: i["root"], "contains the teacher"),
    (lambda i: i["student"], "is the student"),
    (lambda i: i["corpus"], "is the corpus"),
])
def test_output_in_or_around_an_input_is_refused(where, expected, inputs):
    before = snapshot(inputs["root"])
    output = where(inputs)
    line = error_line(*general(inputs, output, "max_steps=1")[::2])
    assert f"--output {output} {expected} " in line and "choose an --output folder of its own" in line, line
    assert snapshot(inputs["root"]) == before


@pytest.mark.parametrize("kind", ["file", "under a file", "unwritable"])
def test_output_that_is_a_file_or_unwritable_is_one_line(kind, inputs, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    output, expected = {"file": (notes, "is a file; give a folder path"),
                        "under a file": (notes / "run", f"lies under the file {notes}"),
                        "unwritable": (Path("/sys/tinybert-guards-test"), "cannot create or write the folder")}[kind]
    before = snapshot(inputs["root"], tmp_path)
    line = error_line(*general(inputs, output, "max_steps=1")[::2])
    assert f"--output {output} " in line or f"--output {output}:" in line, line
    assert expected in line and "Errno" not in line, line
    assert snapshot(inputs["root"], tmp_path) == before
    assert output == notes or not output.exists()


# ---------------------------------------------------------------------------------------------------- the lock


def _lock(output: Path, pid: int):
    (output / LOCK).write_text(json.dumps({"pid": pid, "host": __import__("socket").gethostname(),
                                           "started": "2026-12-04T10:00:00+0000"}) + "\n")


def test_a_second_run_on_a_locked_output_is_refused(inputs, finished, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(finished, output)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as other:  # a live run
        try:
            _lock(output, other.pid)
            before = snapshot(output, inputs["root"])
            line = error_line(*general(inputs, output, "max_steps=2", "--resume")[::2])
        finally:
            other.kill()
    assert f"is in use by another run (pid {other.pid} on " in line and "wait for it to end" in line, line
    assert snapshot(output, inputs["root"]) == before  # the lock is still the other run's


def test_a_stale_lock_does_not_block_a_resume_and_extending_keys_are_said(inputs, finished, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(finished, output)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock(output, int(gone.stdout))  # a run killed with SIGKILL leaves its lock behind
    before = snapshot(inputs["root"])
    code, out, err = general(inputs, output, "max_steps=2", "log_every=1", "--resume")
    assert code == 0, err
    assert f"taking over the stale lock {output / LOCK} of pid {gone.stdout.strip()}" in out, out
    assert "--resume: extending the run (log_every 10 -> 1, max_steps 1 -> 2)" in out, out
    assert [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((output / FINGERPRINT).read_text())["max_steps"] == 2  # the next resume compares with 2
    assert not (output / LOCK).exists() and snapshot(inputs["root"]) == before


# ---------------------------------------------------------------------------------------------- the fingerprint


@pytest.mark.parametrize("change, expected", [
    (["learning_rate=1e-4"], "learning_rate 5e-05 -> 0.0001"),
    (["epochs=2", "terms.attention=0"], "epochs 3.0 -> 2.0, terms.attention 1.0 -> 0"),
    (["--teacher", "student"], "teacher sha256 "),
    (["--corpus", "other"], "corpus sha256 "),
])
def test_resume_with_other_settings_is_refused_naming_each_key(change, expected, inputs, finished, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(finished, output)
    other = tmp_path / "other.txt"
    other.write_text(inputs["corpus"].read_text() + "One more line.\n")
    paths = {"student": dict(teacher=inputs["student"]), "other": dict(corpus=other)}
    extra = paths.get(change[-1], {})
    before = snapshot(output, inputs["root"])
    line = error_line(*general(inputs, output, "max_steps=1", *([] if extra else change), "--resume", **extra)[::2])
    assert "--resume: this run was started with other settings (" in line and expected in line, line
    assert "or start a new run (another --output, or --overwrite)" in line
    assert snapshot(output, inputs["root"]) == before


# ------------------------------------------------------------------------------------------- settings up front


@pytest.mark.parametrize("config, expected", [
    ({"vocab_size": 0}, "vocab_size is 0; a BERT needs a whole number of at least 1"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0; a BERT needs a whole number of at least 1"),
    ({"num_attention_heads": 3}, "hidden_size 64 is not divisible by num_attention_heads 3"),
    ({"num_hidden_layers": 0}, "num_hidden_layers is 0; a BERT needs a whole number of at least 1"),
])
def test_config_values_that_cannot_work_are_refused_in_info_and_distill(config, expected, inputs, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(inputs["teacher"], teacher)
    raw = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**raw, **config}))
    before = snapshot(inputs["root"], teacher)
    assert expected in error_line(*cli("info", teacher)[::2])
    line = error_line(*general(inputs, tmp_path / "run", "max_steps=1", teacher=teacher)[::2])
    assert f"{teacher / 'config.json'}: {expected}" in line, line
    assert snapshot(inputs["root"], teacher) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, expected", [
    ("epochs=0", "recipe key epochs is 0 and max_steps is 0: the run would train for no step"),
    ("learning_rate=-1e-4", "recipe key learning_rate must be positive, got -0.0001"),
    ("batch_size=0", "recipe key batch_size must be positive, got 0"),
    ("warmup_ratio=2", "warmup_ratio (0 to 1) and heldout_fraction (0 to below 1) are fractions, got 2.0"),
    ("temperature=0", "recipe key temperature must be positive, got 0.0"),
])
def test_recipe_values_that_cannot_work_are_refused(override, expected, inputs, tmp_path):
    before = snapshot(inputs["root"])
    line = error_line(*general(inputs, tmp_path / "run", override)[::2])
    assert expected in line, line
    assert snapshot(inputs["root"]) == before and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- vocabularies, NaN


def test_general_distillation_refuses_a_student_with_permuted_ids(inputs, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(inputs["student"], student)
    tokenizer = json.loads((student / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    cat, dog = vocab["cat"], vocab["dog"]
    vocab["cat"], vocab["dog"] = dog, cat
    (student / "tokenizer.json").write_text(json.dumps(tokenizer))
    before = snapshot(inputs["root"], student)
    line = error_line(*general(inputs, tmp_path / "run", "max_steps=1", student=student)[::2])
    first = min(cat, dog)
    teacher_token, student_token = ("cat", "dog") if first == cat else ("dog", "cat")
    assert (f"has another vocabulary than the teacher: id {first} is '{teacher_token}' in the teacher's tokenizer "
            f"and '{student_token}' in the student's") in line, line
    assert snapshot(inputs["root"], student) == before


def test_a_nan_from_the_teacher_says_so_instead_of_lower_learning_rate(inputs, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(inputs["teacher"], teacher)
    weights = load_file(teacher / "model.safetensors")
    weights["encoder.layer.0.output.dense.weight"][0, 0] = float("nan")
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(inputs["root"], teacher)
    line = error_line(*general(inputs, tmp_path / "run", "max_steps=1", teacher=teacher)[::2])
    assert "loss is nan at step 1 (non-finite in hidden" in line, line
    assert "the teacher's outputs on this batch were already non-finite (its hidden state 1)" in line, line
    assert "lower learning_rate" not in line
    assert snapshot(inputs["root"], teacher) == before


# ---------------------------------------------------------------------------------------------------- push


@pytest.mark.parametrize("where", ["repo id", "endpoint"])
def test_push_refuses_a_repo_id_or_endpoint_holding_the_token_without_echoing_it(where, inputs, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo_id, endpoint = ("me/" + TOKEN, "http://127.0.0.1:9") if where == "repo id" else \
        ("me/model", f"http://user:{TOKEN}@127.0.0.1:9")
    before = snapshot(inputs["root"])
    code, out, err = cli("push", inputs["student"], "--repo-id", repo_id, "--endpoint", endpoint)
    line = error_line(code, err)
    assert f"the {where} holds your Hugging Face token" in line, line
    assert TOKEN not in out + err
    assert snapshot(inputs["root"]) == before
