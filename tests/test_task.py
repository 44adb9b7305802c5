"""Fine-tuning, task distillation (both stages) and evaluation, end to end through the CLI on small slices of the
local GLUE tasks with the real MiniLM as the teacher: metrics checked against scikit-learn/scipy on the written
predictions, the teacher-logit cache (no teacher forward in stage 2 after the first pass), resume across stages,
the paper's per-task settings, and one-line errors that leave --output untouched."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tinybert import task as task_module
from tinybert.checkpoint import load_model, load_tokenizer, save_model
from tinybert.data import DataError, get_task, load_split_file
from tinybert.model import Bert, BertConfig
from tinybert.recipe import RecipeError, load_recipe
from tinybert.rundir import RunDir
from tinybert.task import for_task, logits_key, with_head

from launch import cli  # tests/launch.py

# 8 rows at batch 8: one optimizer step per epoch, one evaluation per epoch, on CPU in seconds.
SMALL = ("max_train_examples=8", "max_eval_examples=8", "batch_size=8", "precision=fp32", "keep_checkpoints=2")
GLUE_TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")
SUBMISSION_FILES = {"sst2": "SST-2.tsv", "mrpc": "MRPC.tsv", "rte": "RTE.tsv", "cola": "CoLA.tsv", "stsb": "STS-B.tsv"}


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYBERT_TRACEBACK", raising=False)


@pytest.fixture(scope="module")
def glue(data_dir) -> Path:
    return data_dir / "glue"


@pytest.fixture(scope="module")
def student_dir(minilm_dir, module_tmp) -> Path:
    """A 2-layer student made of MiniLM layers 3 and 6, as `tinybert init --from-teacher` writes it."""
    path = module_tmp / "student"
    code, _, err = cli("init", "--from-teacher", minilm_dir, "--layers", "3,6", "--output", path)
    assert code == 0, err
    return path


@pytest.fixture(scope="module")
def finetuned(minilm_dir, glue, module_tmp):
    """task -> (run directory, printed output) of the MiniLM fine-tuned on 8 rows of it; made once per module."""
    runs = {}

    def get(name: str):
        if name not in runs:
            output = module_tmp / f"finetune-{name}"
            code, out, err = cli("finetune", "--task", name, "--model", minilm_dir, "--data-dir", glue,
                                 "--output", output, *SMALL, "epochs=2", "save_every=100")  # one checkpoint
            assert code == 0, err
            runs[name] = output, out
        return runs[name]

    return get


def reference_metrics(name: str, predictions: np.ndarray, labels: np.ndarray) -> dict:
    """The task's metrics computed straight with scikit-learn and scipy."""
    if name == "stsb":
        return {"pearson": pearsonr(predictions, labels)[0], "spearmanr": spearmanr(predictions, labels)[0]}
    predictions, labels = predictions.astype(int), labels.astype(int)
    if name == "cola":
        return {"matthews_correlation": matthews_corrcoef(labels, predictions)}
    metrics = {"accuracy": accuracy_score(labels, predictions)}
    if name == "mrpc":
        metrics["f1"] = f1_score(labels, predictions)
    return metrics


# ------------------------------------------------------------------------------------------- end to end, every task


@pytest.mark.parametrize("name", GLUE_TASKS)
def test_finetune_then_distill_then_eval(name, finetuned, student_dir, glue, tmp_path):
    task = get_task(name)

    # Fine-tuning: a head with the task's labels is added to the MiniLM; evaluated every epoch; best/ and last/.
    teacher_run, printed = finetuned(name)
    assert f"max_seq_length {task.max_seq_length} (task {name}" in printed
    teacher = load_model(teacher_run / "best")
    assert (teacher.config.num_labels, teacher.config.is_regression) == (task.num_labels, task.is_regression)
    assert load_model(teacher_run / "last").config.num_labels == task.num_labels
    finetune_metrics = json.loads((teacher_run / "metrics.json").read_text())
    assert [h["step"] for h in finetune_metrics["history"]] == [1, 2]  # one evaluation per epoch
    assert finetune_metrics["best"][task.main_metric] == max(
        h[task.main_metric] for h in finetune_metrics["history"] if not math.isnan(h[task.main_metric]))

    # Task distillation: stage 1 (intermediate layers) then stage 2 (predictions), one evaluation per stage-2 epoch.
    run = tmp_path / "distill"
    code, out, err = cli("distill", "--recipe", "task", "--task", name, "--teacher", teacher_run / "best",
                         "--student", student_dir, "--data-dir", glue, "--output", run, *SMALL,
                         "stage1.epochs=1", "stage2.epochs=2")
    assert code == 0, err
    assert "stage1: 1 epochs" in out and "stage2: 2 epochs" in out
    assert f"prediction ({'mse' if task.is_regression else 'soft'})" in out  # stsb: MSE to the gold scores
    stage1 = [r for r in read_log(run / "stage1" / "log.jsonl") if r["kind"] == "train"]
    stage2 = [r for r in read_log(run / "stage2" / "log.jsonl") if r["kind"] == "train"]
    assert len(stage1) == 1 and {"embedding", "hidden", "attention"} <= set(stage1[0]) and "prediction" not in stage1[0]
    assert len(stage2) == 2 and "prediction" in stage2[0] and "attention" not in stage2[0]
    student = load_model(run / "last")
    assert student.config.num_hidden_layers == 2 and student.config.num_labels == task.num_labels
    assert (run / "stage1" / "student" / "config.json").is_file() and (run / "best" / "config.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1, 2] and metrics["last"] == metrics["history"][-1]

    # Evaluation of last/: the numbers the run logged for it, and scikit-learn/scipy's on the same predictions.
    code, out, err = cli("eval", "--task", name, run / "last", "--data-dir", glue, "--max-examples", 8,
                         "--json", tmp_path / "eval.json", "--predictions", tmp_path / "predictions.tsv")
    assert code == 0, err
    assert task.main_metric in out.splitlines()[0]  # the table's header
    result = json.loads((tmp_path / "eval.json").read_text())["results"]["validation"]
    rows = [line.split("\t") for line in (tmp_path / "predictions.tsv").read_text().splitlines()[1:]]
    assert len(rows) == result["examples"] == 8
    predictions, labels = np.array([float(r[2]) for r in rows]), np.array([float(r[3]) for r in rows])
    for metric, expected in reference_metrics(name, predictions, labels).items():
        assert result[metric] == pytest.approx(expected, abs=1e-6, nan_ok=True), metric
        assert metrics["last"][metric] == pytest.approx(result[metric], abs=1e-6, nan_ok=True), metric

    # Test split: the GLUE submission file, one prediction per test row.
    code, out, err = cli("eval", "--task", name, run / "best", "--data-dir", glue, "--split", "test",
                         "--max-examples", 8, "--submission-dir", tmp_path / "submission")
    assert code == 0, err
    lines = (tmp_path / "submission" / SUBMISSION_FILES[name]).read_text().splitlines()
    assert lines[0] == "index\tprediction" and [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(8)]
    allowed = task.label_names if task.string_labels else [str(i) for i in range(task.num_labels)]
    for line in lines[1:]:
        value = line.split("\t")[1]
        assert math.isfinite(float(value)) if task.is_regression else value in allowed


# ---------------------------------------------------------------------------------------------- teacher-logit cache


def test_stage2_runs_no_teacher_forward_after_the_first_pass(finetuned, student_dir, glue, tmp_path, monkeypatch):
    teacher_dir = finetuned("sst2")[0] / "best"
    forwards = []
    load = task_module.load_model

    def load_counting(source):  # counts every forward of the teacher, wherever it is called from
        model = load(source)
        if Path(source) == teacher_dir:
            model.register_forward_hook(lambda *_: forwards.append(1))
        return model

    monkeypatch.setattr(task_module, "load_model", load_counting)

    def run(output: Path) -> tuple[dict, str]:
        forwards.clear()
        code, out, err = cli("distill", "--recipe", "task", "--task", "sst2", "--teacher", teacher_dir,
                             "--student", student_dir, "--data-dir", glue, "--output", output, *SMALL,
                             "max_train_examples=16", "stage1.epochs=0", "stage2.epochs=2")
        assert code == 0, err
        (record,) = [r for r in read_log(output / "stage2" / "log.jsonl") if r["kind"] == "teacher_logits"]
        assert len([r for r in read_log(output / "stage2" / "log.jsonl") if r["kind"] == "train"]) == 4
        return record, out

    # First run: one teacher forward (16 rows, 16 per forward) fills the cache; stage 2's 2 epochs x 2 steps add none.
    record, _ = run(tmp_path / "first")
    assert len(forwards) == 1 and record["cache"] == "miss" and record["teacher_forwards"] == 1
    # Second run on the same teacher and data: read from the cache, no teacher forward at all.
    record, out = run(tmp_path / "second")
    assert len(forwards) == 0 and record["cache"] == "hit" and record["teacher_forwards"] == 0
    assert "cache hit" in out and Path(record["path"]).parent == tmp_path / "cache" / "logits"
    # What the cache holds is the teacher's fp32 logits on those rows.
    cached = torch.load(record["path"], weights_only=True)
    teacher = load(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir)
    rows = [line.split("\t")[0] for line in (glue / "SST-2" / "train.tsv").read_text().splitlines()[1:17]]
    encoded = [tokenizer(text, truncation=True, max_length=64, return_tensors="pt") for text in rows]
    with torch.no_grad():
        expected = torch.cat([teacher.eval()(e["input_ids"], e["attention_mask"], e["token_type_ids"]).logits
                              for e in encoded])
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)


def test_logits_key_follows_teacher_data_and_length(finetuned):
    teacher_dir = finetuned("sst2")[0] / "best"
    rows = datasets.Dataset.from_dict({"input_ids": [[101, 7, 102], [101, 8, 102]], "token_type_ids": [[0] * 3] * 2})
    other = datasets.Dataset.from_dict({"input_ids": [[101, 7, 102], [101, 9, 102]], "token_type_ids": [[0] * 3] * 2})
    key = logits_key(teacher_dir, rows, 64)
    assert key == logits_key(teacher_dir, rows, 64)
    assert len({key, logits_key(teacher_dir, other, 64), logits_key(teacher_dir, rows, 128),
                logits_key(finetuned("sst2")[0] / "last", rows, 64)}) == 4


# ---------------------------------------------------------------------------------------------------------- resume


def test_resume_continues_in_stage2(finetuned, student_dir, glue, tmp_path):
    run = tmp_path / "run"
    args = ("distill", "--recipe", "task", "--task", "sst2", "--teacher", finetuned("sst2")[0] / "best",
            "--student", student_dir, "--data-dir", glue, "--output", run, *SMALL, "stage1.epochs=1",
            "stage2.epochs=2")
    code, _, err = cli(*args)
    assert code == 0, err
    reference = load_file(run / "last" / "model.safetensors")
    stage2 = RunDir(run).stage("stage2")
    assert [c.name for c in stage2.checkpoints()] == ["step-0000001", "step-0000002"]  # one per epoch

    def drop_exports():  # what a run stopped in stage 2 has not written yet (best/ is written as it goes)
        shutil.rmtree(run / "last")
        (run / "metrics.json").unlink()

    # Stopped after stage-2 epoch 1: resumes from that checkpoint and ends with the same weights.
    shutil.rmtree(stage2.checkpoints()[-1])
    drop_exports()
    code, out, err = cli(*args, "--resume")
    assert code == 0, err
    assert "resuming stage 2 from" in out
    assert len([r for r in read_log(run / "stage1" / "log.jsonl") if r["kind"] == "train"]) == 1  # not run again
    assert [h["step"] for h in json.loads((run / "metrics.json").read_text())["history"]] == [1, 2]
    for name, tensor in load_file(run / "last" / "model.safetensors").items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)

    # Stopped right after stage 1: stage 2 starts from the stage-1 student and again ends with the same weights.
    shutil.rmtree(run / "stage2")
    drop_exports()
    code, out, err = cli(*args, "--resume")
    assert code == 0, err
    assert "stage 1 finished earlier" in out
    for name, tensor in load_file(run / "last" / "model.safetensors").items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ custom tasks


def test_custom_task_finetune_distill_with_augmented_rows_and_eval(minilm_dir, student_dir, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("question,answer,y\n" + "".join(
        f"is {w} red?,{'yes' if i % 2 else 'no'} it is,{'yes' if i % 2 else 'no'}\n"
        for i, w in enumerate(["the sky", "a rose", "grass", "blood", "snow", "a cherry", "coal", "a tomato"])))
    dev = tmp_path / "dev.csv"
    dev.write_text("question,answer,y\nis fire red?,yes it is,yes\nis milk red?,no it is not,no\n"
                   "is wine red?,yes,yes\nis ice red?,no,no\n")
    augmented = tmp_path / "augmented.jsonl"
    augmented.write_text("".join(
        json.dumps({"question": f"is thing {i} red?", "answer": "maybe", "y": "yes" if i % 2 else "no"}) + "\n"
        for i in range(12)))
    source = ("--train", train, "--validation", dev, "--text-columns", "question,answer", "--label-column", "y")

    code, out, err = cli("finetune", "--model", minilm_dir, *source, "--output", tmp_path / "teacher",
                         "batch_size=4", "epochs=1", "precision=fp32")
    assert code == 0, err
    teacher = load_model(tmp_path / "teacher" / "best")
    assert teacher.config.id2label == {0: "no", 1: "yes"}
    assert "max_seq_length 128 (task custom: sentence pairs)" in out

    code, out, err = cli("distill", "--recipe", "task", "--teacher", tmp_path / "teacher" / "best", "--student",
                         student_dir, *source, "--augmented", augmented, "--output", tmp_path / "student",
                         "batch_size=4", "epochs=1", "precision=fp32")
    assert code == 0, err
    assert f"12 train rows from {augmented}" in out  # the augmented rows replace the train split, in both stages
    assert len([r for r in read_log(tmp_path / "student" / "stage1" / "log.jsonl") if r["kind"] == "train"]) == 3
    (record,) = [r for r in read_log(tmp_path / "student" / "stage2" / "log.jsonl") if r["kind"] == "teacher_logits"]
    assert record["rows"] == 12

    code, out, err = cli("eval", tmp_path / "student" / "best", *source, "--json", "-")
    assert code == 0, err
    result = json.loads(out)["results"]["validation"]
    assert result["examples"] == 4 and set(result) == {"examples", "accuracy", "f1"}


# ----------------------------------------------------------------------------------- recipes: the paper's settings


@pytest.mark.parametrize("name, stage1_epochs, length", [("sst2", 20, 64), ("cola", 50, 64), ("mnli", 10, 128),
                                                          ("qqp", 10, 128), ("qnli", 10, 128), ("stsb", 20, 128)])
def test_task_recipe_applies_the_papers_per_task_settings(name, stage1_epochs, length):
    recipe = load_recipe("task")
    stage1, source = for_task(recipe.stage("stage1"), get_task(name))
    stage2, _ = for_task(recipe.stage("stage2"), get_task(name))
    assert (stage1.epochs, stage1.max_seq_length, stage2.epochs, stage2.max_seq_length) == (
        stage1_epochs, length, 3, length)
    assert source["epochs"] == f"task_epochs.{name if name in ('cola', 'mnli', 'qqp', 'qnli') else 'default'}"
    assert (stage1.learning_rate, stage1.scheduler, stage1.warmup_ratio, stage1.batch_size) == (5e-5, "constant", 0, 32)
    assert (stage2.learning_rate, stage2.scheduler, stage2.warmup_ratio) == (3e-5, "linear", 0.1)
    assert set(stage1.terms) == {"embedding", "hidden", "attention"} and set(stage2.terms) == {"prediction"}


def test_stage_overrides():
    recipe = load_recipe("task", ["stage1.epochs=1", "max_seq_length=32"])
    cola = get_task("cola")
    assert for_task(recipe.stage("stage1"), cola)[0].epochs == 1  # beats the task table
    assert for_task(recipe.stage("stage2"), cola)[0].epochs == 3
    assert recipe.stage("stage1").max_seq_length == recipe.stage("stage2").max_seq_length == 32
    both = load_recipe("task", ["learning_rate=1e-4"])  # no prefix: every stage
    assert both.stage("stage1").learning_rate == both.stage("stage2").learning_rate == 1e-4
    with pytest.raises(RecipeError, match="stage1.epoch'.*did you mean stage1.epochs"):
        load_recipe("task", ["stage1.epoch=1"])
    with pytest.raises(RecipeError, match="stage2.learning_rate: expected float"):
        load_recipe("task", ["stage2.learning_rate=fast"])
    with pytest.raises(RecipeError, match="stage2: recipe key prediction"):
        load_recipe("task", ["stage2.prediction=kl"])


def test_finetune_recipe_has_the_standard_glue_settings():
    r = load_recipe("finetune")
    assert (r.learning_rate, r.batch_size, r.epochs, r.warmup_ratio, r.scheduler, r.weight_decay) == (
        2e-5, 32, 3, 0.1, "linear", 0.01)
    assert r.max_seq_length is None and for_task(r, get_task("mrpc"))[0].max_seq_length == 128


# ----------------------------------------------------------------------------------------------- augmented files


def test_augmented_files_in_glue_layout_and_with_named_columns(glue, tmp_path):
    cola = tmp_path / "train_aug.tsv"  # CoLA's headerless layout, as data_augmentation.py writes it
    cola.write_text("".join((glue / "CoLA" / "train.tsv").read_text().splitlines(keepends=True)[:5]))
    rows = load_split_file(cola, get_task("cola"))
    assert len(rows) == 5 and rows.features["label"].names == ["unacceptable", "acceptable"]
    rte = tmp_path / "rte.jsonl"
    rte.write_text('{"sentence1": "a", "sentence2": "b", "label": "not_entailment"}\n'
                   '{"sentence1": "c", "sentence2": "d", "label": 0}\n')
    assert list(load_split_file(rte, get_task("rte"))["label"]) == [1, 0]  # names and ids
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 1: label 'maybe'"):
        load_split_file(bad, get_task("rte"))


# ------------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def three_label_dir(minilm_dir, module_tmp) -> Path:
    """The MiniLM with a 3-label (MNLI) head."""
    path = module_tmp / "three-labels"
    save_model(with_head(load_model(minilm_dir), get_task("mnli"), "minilm"), path, load_tokenizer(minilm_dir))
    return path


@pytest.fixture(scope="module")
def other_vocab_students(student_dir, module_tmp) -> dict[str, Path]:
    """Students whose vocabulary differs from the MiniLM's: in size, and in its tokens only."""
    size = module_tmp / "vocab-size"
    save_model(Bert(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64)), size)
    tokens = module_tmp / "vocab-tokens"
    tokens.mkdir()
    for file in student_dir.iterdir():
        shutil.copy(file, tokens / file.name)
    tokenizer = json.loads((tokens / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    (tokens / "tokenizer.json").write_text(json.dumps(tokenizer))
    return {"size": size, "tokens": tokens}


@pytest.fixture
def output(tmp_path) -> Path:
    """An --output that already holds a file: an error must leave it as it was."""
    path = tmp_path / "output"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


def _bad_glue(tmp_path: Path, kind: str) -> Path:
    root = tmp_path / kind
    (root / "SST-2").mkdir(parents=True)
    if kind == "missing":  # no dev.tsv
        (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    else:  # line 3 lacks its label
        (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\n")
        (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    return root


CASES = {
    "unknown task": (lambda p: ("finetune", "--task", "sst3", "--model", p["minilm"]), "unknown task 'sst3'"),
    "missing split": (lambda p: ("finetune", "--task", "sst2", "--model", p["minilm"], "--data-dir",
                                 _bad_glue(p["tmp"], "missing")), "missing split file"),
    "malformed row": (lambda p: ("finetune", "--task", "sst2", "--model", p["minilm"], "--data-dir",
                                 _bad_glue(p["tmp"], "malformed")), "train.tsv line 3: expected 2"),
    "head with other labels": (lambda p: ("finetune", "--task", "sst2", "--model", p["three"], "--data-dir",
                                          p["glue"]), "has 3 labels but task sst2 has 2 labels"),
    "teacher with other labels": (lambda p: ("distill", "--recipe", "task", "--task", "sst2", "--teacher",
                                             p["three"], "--student", p["student"], "--data-dir", p["glue"]),
                                  "has 3 labels but task sst2 has 2 labels"),
    "teacher without head": (lambda p: ("distill", "--recipe", "task", "--task", "sst2", "--teacher", p["minilm"],
                                        "--student", p["student"], "--data-dir", p["glue"]),
                             "has no classification head"),
    "student vocabulary size": (lambda p: ("distill", "--recipe", "task", "--task", "sst2", "--teacher",
                                           p["teacher"], "--student", p["vocab"]["size"], "--data-dir", p["glue"]),
                                "vocabulary of 100 tokens but the teacher has 30522"),
    "student vocabulary tokens": (lambda p: ("distill", "--recipe", "task", "--task", "sst2", "--teacher",
                                             p["teacher"], "--student", p["vocab"]["tokens"], "--data-dir",
                                             p["glue"]), "another vocabulary than the teacher"),
    "eval on another task": (lambda p: ("eval", "--task", "stsb", p["teacher"], "--data-dir", p["glue"]),
                             "has 2 labels but task stsb has a regression head"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_output_alone(case, minilm_dir, student_dir, finetuned, three_label_dir,
                                                       other_vocab_students, glue, output, tmp_path):
    paths = {"minilm": minilm_dir, "student": student_dir, "teacher": finetuned("sst2")[0] / "best",
             "three": three_label_dir, "vocab": other_vocab_students, "glue": glue, "tmp": tmp_path}
    args, message = CASES[case]
    args = args(paths)
    before = snapshot(output)
    code, out, err = cli(*args, *(("--output", output) if args[0] != "eval" else ()))
    assert code == 1, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert snapshot(output) == before


def test_an_existing_run_is_not_replaced_without_overwrite(minilm_dir, glue, output):
    (output / "metrics.json").write_text("{}")
    before = snapshot(output)
    code, _, err = cli("finetune", "--task", "sst2", "--model", minilm_dir, "--data-dir", glue, "--output", output,
                       *SMALL)
    assert code == 1 and "already holds a run; pass --resume" in err
    assert snapshot(output) == before
