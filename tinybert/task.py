"""Labelled tasks on the shared loop of train.py: fine-tuning (a teacher, or a student) on the gold labels, task
distillation (TinyBERT section 3.2: stage 1 distils the intermediate layers, stage 2 the predictions, with the
paper's per-task lengths and epochs), and evaluation with the GLUE metrics and submission files.

What a run writes is rundir.RunDir's contract. best/ is the best model by the task's main metric on the dev set
(evaluated every epoch), last/ the model at the end of training; stage1/student is the student that enters stage 2,
so `--resume` after a finished stage 1 starts stage 2 from it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor, nn

from tinybert.checkpoint import CheckpointError, load_model, load_tokenizer, save_model
from tinybert.data import (
    DataError,
    TaskSpec,
    collate_labelled,
    file_sha256,
    get_task,
    length_grouped_batches,
    load_custom,
    load_split_file,
    load_task,
    tokenize,
    write_submission,
)
from tinybert.distill import Distiller
from tinybert.guards import check_model_configs, check_same_vocabulary, check_schedule, run_fingerprint
from tinybert.losses import hard_cross_entropy, regression_mse
from tinybert.model import PRESETS, Bert
from tinybert.recipe import Recipe, RecipeError
from tinybert.rundir import STAGE1, STAGE2, Metrics, RunDir
from tinybert.train import (
    Run,
    Stage,
    average_terms,
    barrier,
    check_output,
    collate_rows,
    decide_precision,
    default_device,
    micro_batch_size,
    run_stage,
    seed_everything,
    start_output,
    start_run,
    teacher_dtype,
    total_steps,
    world,
)

# Bump when the way teacher logits are computed changes, so older cache files are not reused.
_LOGITS_FORMAT = "tinybert-logits-1"


# ------------------------------------------------------------------------------------------------------------ data


@dataclass
class TaskSource:
    """Where a task's rows come from: a GLUE task (`data_dir` with SST-2/..., or the hub), or your own files."""

    task: str | None = None  # a GLUE task name; None: a custom task from `train`/`validation`
    data_dir: str | None = None
    train: str | None = None  # custom task files (CSV, TSV, JSON, JSONL)
    validation: str | None = None
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    augmented: str | None = None  # replaces the train split (same columns as the task's)

    def __post_init__(self):
        if (self.task is None) == (self.train is None):
            raise DataError("give either a GLUE task (--task sst2) or your own files (--train FILE --validation FILE "
                            "--text-columns a,b --label-column y)")
        if self.train is not None and not self.text_columns:
            raise DataError("a custom task needs --text-columns (one or two column names, e.g. question,answer)")

    def load(self, kinds: tuple[str, ...], max_train: int = 0, max_eval: int = 0) -> tuple[TaskSpec, dict]:
        """The task and its splits for `kinds` (train, dev, test), each cut to its first max_* rows when > 0.

        Returns {split name: Dataset with text_a[, text_b], label, idx}; dev is one split per dev set of the task
        (mnli: validation_matched, validation_mismatched), the first one picks the best checkpoint."""
        if self.task is not None:
            task = get_task(self.task)
            by_kind = {"train": ("train",), "dev": task.dev_splits, "test": task.test_splits}
            names = [s for kind in kinds for s in by_kind[kind] if not (s == "train" and self.augmented)]
            splits = dict(load_task(task.name, self.data_dir, splits=names)) if names else {}
        else:
            if "test" in kinds:
                raise DataError("a custom task has no GLUE test split; evaluate --split dev")
            if self.validation is None:
                raise DataError("a custom task needs --validation FILE (the dev set every epoch is scored on)")
            loaded, task = load_custom({"train": self.train, "validation": self.validation}, self.text_columns,
                                       self.label_column)
            splits = {s: ds for s, ds in loaded.items() if s != "train" or "train" in kinds}
        if self.augmented and "train" in kinds:
            splits["train"] = load_split_file(self.augmented, task, "train", self.label_column)
        out = {}
        for split, ds in splits.items():
            limit = max_train if split == "train" else max_eval
            out[split] = ds.select(range(limit)) if 0 < limit < len(ds) else ds
        return task, out


def for_task(recipe: Recipe, task: TaskSpec) -> tuple[Recipe, dict[str, str]]:
    """Fill the keys a recipe leaves to the task (null max_seq_length, null epochs); also say where each came from."""
    changes, source = {}, {}
    if recipe.max_seq_length is None:
        changes["max_seq_length"] = task.max_seq_length
        source["max_seq_length"] = f"task {task.name}: {'sentence pairs' if task.is_pair else 'single sentences'}"
    if recipe.epochs is None:
        key = task.name if task.name in recipe.task_epochs else "default"
        if key not in recipe.task_epochs:
            raise RecipeError(f"recipe key epochs is null but task_epochs has neither {task.name} nor default")
        changes["epochs"] = float(recipe.task_epochs[key])
        source["epochs"] = f"task_epochs.{key}"
    return dataclasses.replace(recipe, **changes), source


def collate_batch(features: list[dict], pad_token_id: int) -> dict[str, Tensor]:
    """data.collate_labelled, plus the cached teacher logits (B, C) when the rows carry them."""
    batch = collate_labelled(features, pad_token_id)
    if "teacher_logits" in features[0]:
        batch["teacher_logits"] = torch.tensor([f["teacher_logits"] for f in features], dtype=torch.float)
    return batch


def labelled_stage(name: str, module: nn.Module | None, weights: dict[str, float], train, recipe: Recipe, pad: int,
                   evaluate=None, on_eval=None) -> Stage:
    """A stage on tokenized labelled rows: each epoch shuffled micro-batches of similar-length rows (the same epoch
    always gives the same batches), padded per batch."""
    lengths, micro = [len(ids) for ids in train["input_ids"]], micro_batch_size(recipe)

    def plan(epoch: int) -> list[list[int]]:
        return length_grouped_batches(lengths, micro, torch.Generator().manual_seed(recipe.seed + epoch))

    return Stage(name, module, weights, train, plan, partial(collate_batch, pad_token_id=pad), evaluate, on_eval)


# ---------------------------------------------------------------------------------------------------------- models


def check_head(model: Bert, task: TaskSpec, who: str):
    """A model that must already predict `task` (a teacher, a model to evaluate): same label count, same order."""
    c = model.config
    if not c.num_labels:
        raise CheckpointError(f"{who} has no classification head; fine-tune it on the task first "
                              f"(tinybert finetune --task {task.name} --model ... --output DIR)")
    _check_labels(model, task, who)


def _check_labels(model: Bert, task: TaskSpec, who: str):
    c = model.config
    kind = lambda n, regression: "a regression head" if regression else f"{n} labels"  # noqa: E731
    if c.num_labels != task.num_labels or c.is_regression != task.is_regression:
        raise CheckpointError(f"{who} has {kind(c.num_labels, c.is_regression)} but task {task.name} has "
                              f"{kind(task.num_labels, task.is_regression)}")
    if c.id2label and task.label_names:
        # An HF-trained teacher may name the same classes in another order (MNLI, original issue #229).
        names = [str(c.id2label[i]).lower() for i in range(c.num_labels)]
        if sorted(names) == sorted(task.label_names) and names != list(task.label_names):
            raise CheckpointError(f"{who} orders its labels {names} but task {task.name} orders them "
                                  f"{list(task.label_names)}; its predictions would be scored against other classes")
        if sorted(names) != sorted(task.label_names) and not all(re.fullmatch(r"label_\d+", n) for n in names):
            warnings.warn(f"{who} names its labels {names}, not task {task.name}'s {list(task.label_names)}; "
                          f"was it trained on another task?", stacklevel=3)


def with_head(model: Bert, task: TaskSpec, who: str) -> Bert:
    """`model` with a head for `task`: its own when it has one with the task's labels, else a newly initialised one
    (a model whose head has another number of labels is an error). The masked-LM head is dropped."""
    c = model.config
    if c.num_labels:
        _check_labels(model, task, who)
        if model.mlm is None:
            return model
        config = c
    else:
        config = c.replace(num_labels=task.num_labels,
                           problem_type="regression" if task.is_regression else "single_label_classification",
                           id2label=None if task.is_regression else dict(enumerate(task.label_names)))
    out = Bert(config)
    result = out.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mlm.")},
                                 strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"classifier.weight", "classifier.bias"}
    return out


def export(model: Bert, directory: Path, tokenizer):
    """Save an fp32 copy (DeepSpeed bf16 trains bf16 weights) as a Hugging Face directory."""
    save_model(model if all(p.dtype == torch.float32 for p in model.parameters()) else copy.deepcopy(model).float(),
               directory, tokenizer)


class Finetuner(nn.Module):
    """A model trained on the gold labels: {"prediction": cross-entropy, or MSE for a regression head}."""

    def __init__(self, model: Bert):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).logits  # B, C
        loss = regression_mse if self.model.config.is_regression else hard_cross_entropy
        return {"prediction": loss(logits, batch["labels"])}


# ------------------------------------------------------------------------------------------------------ evaluation


def length_batches(dataset, pad_token_id: int, batch_size: int):
    """(row indices, batch of input_ids, attention_mask, token_type_ids) over a tokenized dataset, rows taken in
    order of length so little is padded; shared by PyTorch and ONNX Runtime prediction."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = collate_rows(dataset, indices, partial(collate_labelled, pad_token_id=pad_token_id))
        yield indices, {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def predict(model: Bert, dataset, pad_token_id: int, batch_size: int, device: torch.device) -> Tensor:
    """Logits (N, C) in row order, in fp32 without dropout; rows are batched by length so little is padded."""
    model.eval()
    out = torch.empty(len(dataset), model.config.num_labels)
    for indices, batch in length_batches(dataset, pad_token_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
        out[indices] = logits.float().cpu()
    return out


def to_predictions(logits: Tensor, task: TaskSpec) -> np.ndarray:
    """Class ids (argmax), or the scores of a regression head."""
    return logits[:, 0].numpy() if task.is_regression else logits.argmax(-1).numpy()


def score(model: Bert, task: TaskSpec, dev: dict, pad_token_id: int, batch_size: int, device) -> dict[str, float]:
    """The task's metrics on every dev split; the first split's keep their names, others get `split/` prefixed."""
    from tinybert.metrics import compute_metrics

    metrics = {}
    for i, (split, ds) in enumerate(dev.items()):
        predictions = to_predictions(predict(model, ds, pad_token_id, batch_size, device), task)
        for name, value in compute_metrics(task, predictions, np.asarray(list(ds["labels"]))).items():
            metrics[name if i == 0 else f"{split}/{name}"] = value
    return metrics


class Keeper:
    """on_eval for the loop: exports `model` to best/ when the main metric improves, keeps every evaluation.

    `state` travels in the checkpoints (the loop's extra_state), so a resumed run knows the best so far."""

    def __init__(self, model: Bert, tokenizer, run_dir: RunDir, main_metric: str, stage: str, state: dict):
        self.model, self.tokenizer, self.run_dir, self.main, self.stage = model, tokenizer, run_dir, main_metric, stage
        self.state = state
        state.setdefault("best", None)
        state.setdefault("history", [])

    def __call__(self, step: int, metrics: dict[str, float]):
        self.state["history"].append({"stage": self.stage, "step": step, **metrics})
        value = metrics[self.main]
        best = self.state["best"]
        # NaN (e.g. a correlation of constant predictions) never beats a number.
        if best is None or (not math.isnan(value) and (math.isnan(best[self.main]) or value > best[self.main])):
            self.state["best"] = {"stage": self.stage, "step": step, **metrics}
            if world()[0] == 0:
                export(self.model, self.run_dir.best, self.tokenizer)


# ---------------------------------------------------------------------------------------------- teacher logits


def logits_key(teacher_dir: str | os.PathLike, dataset, max_seq_length: int) -> str:
    """Names the teacher's logits on a tokenised dataset: the hashes of the teacher's weights and config.json, of the
    token ids the teacher sees, and max_seq_length. Copies of the same teacher and data share the entry; any change
    to the weights, the rows, the tokenizer or the length gets a new one."""
    teacher_dir = Path(teacher_dir)
    weights = next((teacher_dir / n for n in ("model.safetensors", "pytorch_model.bin") if (teacher_dir / n).is_file()))
    tokens = pickle.dumps((list(dataset["input_ids"]), list(dataset["token_type_ids"])), protocol=4)
    parts = [_LOGITS_FORMAT, file_sha256(weights), file_sha256(teacher_dir / "config.json"),
             hashlib.sha256(tokens).hexdigest(), str(max_seq_length)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def teacher_logits(teacher: Bert, teacher_dir: str, dataset, max_seq_length: int, pad_token_id: int,
                   batch_size: int, device, echo=print) -> tuple[Tensor, dict]:
    """The teacher's fp32 logits (N, C) on `dataset`, computed once and then read from the cache: stage 2 feeds them
    in the batch, so it runs no teacher forward, in any epoch or any later run on the same teacher and data.

    Returns the logits and a log record (cache hit or miss, teacher_forwards = teacher batches run)."""
    cache = Path(os.environ.get("TINYBERT_CACHE", Path.home() / ".cache" / "tinybert")).expanduser() / "logits"
    path = cache / f"{logits_key(teacher_dir, dataset, max_seq_length)}.pt"
    if path.is_file():
        logits = torch.load(path, map_location="cpu", weights_only=True)
        if logits.shape == (len(dataset), teacher.config.num_labels):
            echo(f"teacher logits: cache hit {path} ({len(dataset)} rows, no teacher forward)")
            return logits, {"cache": "hit", "path": str(path), "rows": len(dataset), "teacher_forwards": 0}
    started = time.perf_counter()
    teacher.to(device)
    logits = predict(teacher, dataset, pad_token_id, batch_size, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    torch.save(logits, tmp)
    os.replace(tmp, path)  # atomic: a concurrent or interrupted run never reads half a file
    echo(f"teacher logits: computed for {len(dataset)} rows in {time.perf_counter() - started:.1f} s, "
         f"cached in {path}")
    return logits, {"cache": "miss", "path": str(path), "rows": len(dataset),
                    "teacher_forwards": math.ceil(len(dataset) / batch_size)}


# ------------------------------------------------------------------------------------------------ run directories


def describe_stage(name: str, recipe: Recipe, source: dict[str, str], steps: int, rows: int, loss: str) -> str:
    """One line per stage with the settings it runs with, and where the task-dependent ones came from."""
    where = lambda key: f" ({source[key]})" if key in source else ""  # noqa: E731
    return (f"{name}: {recipe.epochs:g} epochs{where('epochs')}, max_seq_length {recipe.max_seq_length}"
            f"{where('max_seq_length')}, batch {recipe.batch_size}, lr {recipe.learning_rate:g} {recipe.scheduler}, "
            f"warmup {int(recipe.warmup_ratio * steps)} steps; {steps} steps on {rows} rows; loss {loss}")


def _data_inputs(data: TaskSource) -> dict[str, str | None]:
    """The files and folders a task's rows come from, by the names the messages give them."""
    return {"data folder": data.data_dir, "train file": data.train, "validation file": data.validation,
            "augmented file": data.augmented}


def _fingerprint(recipes: dict, data: TaskSource, models: dict, dry_run: bool) -> dict | None:
    """The run's fingerprint (guards.run_fingerprint): the recipe(s) as given (precision before `auto` is decided:
    a timing probe may decide it otherwise on a resume), the task and its columns, the models, the data's bytes."""
    if dry_run:
        return None
    task = {"task": data.task, "text_columns": list(data.text_columns), "label_column": data.label_column}
    return run_fingerprint({**recipes, **task}, models=models, data=_data_inputs(data))


# ------------------------------------------------------------------------------------------------------ fine-tuning


def run_finetune(recipe: Recipe, data: TaskSource, *, model: str, output: Path, tokenizer: str | None = None,
                 resume: bool = False, overwrite: bool = False, dry_run: bool = False, progress: bool = True,
                 echo=print) -> Path | None:
    """Fine-tune `model` (a directory or a preset) on the task's gold labels; returns output/best."""
    run_dir = RunDir(output)
    models = {"model": model, "tokenizer": tokenizer}
    check_model_configs({"model": model})
    task, raw = data.load(("train", "dev"), recipe.max_train_examples, recipe.max_eval_examples)
    recipe, source = for_task(recipe, task)
    check_schedule(recipe)
    fingerprint = _fingerprint(recipe.to_dict(), data, models, dry_run)
    run = start_run(recipe, dry_run=dry_run)
    say = run.say(echo)
    if tokenizer is None and str(model) in PRESETS and not Path(model).exists():
        raise CheckpointError(f"{model} is a preset with no tokenizer; pass --tokenizer DIR (the teacher's)")
    bert = load_model(model)
    verdict = decide_precision(recipe.precision, run.device, bert.config, say)
    recipe = dataclasses.replace(recipe, precision=verdict.precision)
    tok = load_tokenizer(tokenizer or model, vocab_size=bert.config.vocab_size)
    bert = with_head(bert, task, f"model {model}")
    tokenized = tokenize(datasets.DatasetDict(raw), tok, recipe.max_seq_length)
    train_set, dev = tokenized["train"], {s: ds for s, ds in tokenized.items() if s != "train"}
    micro, pad = micro_batch_size(recipe), tok.pad_token_id
    state = {}  # best and history; travels in the checkpoints
    stage = labelled_stage("finetune", Finetuner(bert), {"prediction": 1.0}, train_set, recipe, pad,
                           evaluate=lambda module: score(module.model, task, dev, pad, micro * 2, run.device),
                           on_eval=Keeper(bert, tok, run_dir, task.main_metric, "finetune", state))
    steps = total_steps(stage, recipe)
    loss = "MSE to the gold scores" if task.is_regression else "cross-entropy to the gold labels"
    say(describe_stage("finetune", recipe, source, steps, len(train_set), loss))
    if dry_run:
        return None

    check_output(run_dir, "finetune", resume=resume, overwrite=overwrite, needs_checkpoint=True,
                 inputs={**models, **_data_inputs(data)}, fingerprint=fingerprint, echo=say)

    record = {**recipe.to_dict(), "model": str(model), "task": task.name, "precision_decision": verdict.to_dict()}
    run_stage(stage, recipe, run_dir, steps, run.device, resume=resume, extra_state={"tracker": state},
              on_start=lambda: start_output(run_dir, "finetune", record, fingerprint, clear=overwrite and not resume),
              progress=progress, echo=say)
    if run.main:
        finish(bert, tok, run_dir, task, state, echo, "step")
    barrier()  # the other processes return once best/ and last/ are on disk
    return run_dir.best


def finish(model: Bert, tokenizer, run_dir: RunDir, task: TaskSpec, state: dict, echo, when: str):
    """After the last epoch: export last/ (best/ is written as it improves), write metrics.json, say where."""
    export(model, run_dir.last, tokenizer)
    Metrics(task=task.name, main_metric=task.main_metric, best=state["best"],
            last=state["history"][-1] if state["history"] else None, history=state["history"]).write(run_dir.metrics)
    best = state["best"]
    echo(f"best {task.main_metric} {best[task.main_metric]:.4f} at {when} {best['step']}: {run_dir.best}; "
         f"last: {run_dir.last}")


# ------------------------------------------------------------------------------------------------ task distillation


def _prediction_mode(recipe: Recipe, task: TaskSpec, echo) -> str:
    mode = recipe.prediction
    if task.is_regression and mode == "soft":
        echo(f"stage2: task {task.name} is a regression; prediction=soft is read as mse (MSE to the gold scores, "
             f"as the original); prediction=mse_teacher regresses to the teacher's scores")
        return "mse"
    if task.is_regression and mode == "hard":
        raise RecipeError(f"prediction=hard needs classes but task {task.name} is a regression; use mse or "
                          f"mse_teacher")
    if not task.is_regression and mode == "mse":
        raise RecipeError(f"prediction=mse regresses to gold scores but task {task.name} has classes; use soft, "
                          f"hard or mse_teacher")
    return mode


def _stage_terms(r1: Recipe, r2: Recipe) -> tuple[dict[str, float], dict[str, float]]:
    """Each stage's loss terms with a non-zero weight; at least one each."""
    terms = tuple({name: weight for name, weight in r.terms.items() if weight} for r in (r1, r2))
    if not all(terms):
        raise RecipeError("each stage needs at least one loss term with a non-zero weight (stage1.terms, "
                          "stage2.terms)")
    return terms


def _logits_column(run: Run, teacher: Bert, teacher_dir: str, train2, recipe: Recipe, pad: int, echo):
    """Stage 2's rows with the teacher's logits as a column, and the log record of how they were had: rank 0
    computes them (or reads the cache), the other processes read them from the cache once it is written."""
    args = (teacher, teacher_dir, train2, recipe.max_seq_length, pad, 2 * micro_batch_size(recipe), run.device)
    if run.main:
        logits, record = teacher_logits(*args, echo)
    barrier()
    if not run.main:
        logits, record = teacher_logits(*args, lambda *a: None)
    return train2.add_column("teacher_logits", logits.tolist()), record


def _distiller(teacher: Bert, student: Bert, r: Recipe, terms: dict, prediction: str) -> Distiller:
    return Distiller(teacher, student, r.layer_map, terms=tuple(terms), attention_mode=r.attention_mode,
                     prediction=prediction, temperature=r.temperature, soft_mode=r.soft_mode,
                     shared_projection=r.shared_projection, relation_heads=r.relation_heads,
                     teacher_layer=r.teacher_layer)


def run_task(recipe: Recipe, data: TaskSource, *, teacher: str, student: str, output: Path, resume: bool = False,
             overwrite: bool = False, dry_run: bool = False, progress: bool = True, echo=print) -> Path | None:
    """Task distillation of `teacher` (fine-tuned on the task) into `student`: stage 1 then stage 2.
    Returns output/best (the student by the task's main metric in stage 2)."""
    from tinybert.general import build_student, carry_projections

    run_dir = RunDir(output)
    models = {"teacher": teacher, "student": student}
    check_model_configs(models)
    task, raw = data.load(("train", "dev"), recipe.max_train_examples, recipe.max_eval_examples)
    (r1, source1), (r2, source2) = for_task(recipe.stage(STAGE1), task), for_task(recipe.stage(STAGE2), task)
    check_schedule(r2, STAGE2)  # stage 1 may have 0 epochs: it is then skipped
    fingerprint = _fingerprint({STAGE1: r1.to_dict(), STAGE2: r2.to_dict()}, data, models, dry_run)
    run = start_run(r1, dry_run=dry_run)
    say = run.say(echo)
    prediction = _prediction_mode(r2, task, say)
    teacher_model = load_model(teacher)
    v1 = decide_precision(r1.precision, run.device, teacher_model.config, say)
    v2 = v1 if r2.precision == r1.precision else decide_precision(r2.precision, run.device, teacher_model.config, say)
    r1, r2 = dataclasses.replace(r1, precision=v1.precision), dataclasses.replace(r2, precision=v2.precision)
    check_head(teacher_model, task, f"teacher {teacher}")
    tok = load_tokenizer(teacher, vocab_size=teacher_model.config.vocab_size)
    student_model = with_head(build_student(student, teacher_model), task, f"student {student}")
    check_same_vocabulary(student, tok)
    terms1, terms2 = _stage_terms(r1, r2)
    pad = tok.pad_token_id
    sets = {n: tokenize(datasets.DatasetDict(raw), tok, r.max_seq_length) for n, r in (("stage1", r1), ("stage2", r2))}
    dev2 = {s: ds for s, ds in sets["stage2"].items() if s != "train"}
    stage1 = _stage1(_distiller(teacher_model, student_model, r1, terms1, prediction), r1, terms1, sets["stage1"], pad,
                     run.device)
    carry_projections(stage1.module, student, say)
    steps1 = total_steps(stage1, r1)
    steps2 = total_steps(labelled_stage("count", None, {}, sets["stage2"]["train"], r2, pad), r2)  # stage 2's own count
    rows = f"{len(raw['train'])} train rows" + (f" from {data.augmented}" if data.augmented else "")
    say(f"task {task.name}: {rows}; dev: {', '.join(f'{s} {len(ds)}' for s, ds in dev2.items())}; "
        f"main metric {task.main_metric}\n"
        f"layer map (student state <- teacher state, 0 = embeddings): {stage1.module.layer_map or 'not used'}\n"
        + "".join(line + "\n" for line in stage1.module.describe_relations())
        + describe_stage("stage1", r1, source1, steps1, len(raw["train"]), " + ".join(terms1)) + "\n"
        + describe_stage("stage2", r2, source2, steps2, len(raw["train"]), " + ".join(terms2) + f" ({prediction})"))
    if dry_run:
        return None

    check_output(run_dir, "task", resume=resume, overwrite=overwrite, inputs={**models, **_data_inputs(data)},
                 fingerprint=fingerprint, echo=say)
    # Teacher logits first: before stage 1 may cast the teacher to bf16 for DeepSpeed.
    train2, logits_record = sets["stage2"]["train"], None
    if "prediction" in terms2 and prediction in ("soft", "mse_teacher"):
        train2, logits_record = _logits_column(run, teacher_model, teacher, train2, r2, pad, say)
    record = {"stage1": r1.to_dict(), "stage2": {**r2.to_dict(), "prediction": prediction}, "teacher": str(teacher),
              "student": str(student), "task": task.name, "augmented": data.augmented,
              "precision_decision": {"stage1": v1.to_dict(), "stage2": v2.to_dict()}}
    start_output(run_dir, "task", record, fingerprint, clear=overwrite and not resume)
    if logits_record is not None and run.main:  # stage 2's log starts with how its teacher logits were had
        run_dir.stage(STAGE2).path.mkdir(parents=True, exist_ok=True)
        with run_dir.stage(STAGE2).log.open("a") as f:
            f.write(json.dumps({"stage": STAGE2, "kind": "teacher_logits", "step": 0, **logits_record}) + "\n")

    teacher_model.to(run.device)
    student_dir = _run_stage1(run, stage1, r1, steps1, run_dir, tok, resume=resume, progress=progress, say=say)

    # Stage 2: the prediction layer, from the stage-1 student on disk (the same whether or not stage 1 ran now).
    seed_everything(r2.seed)
    student2 = load_model(student_dir)
    teacher_model.to(teacher_dtype(r2.precision))
    state, micro2 = {}, micro_batch_size(r2)
    stage2 = labelled_stage("stage2", _distiller(teacher_model, student2, r2, terms2, prediction), terms2, train2,
                            r2, pad, evaluate=lambda m: score(m.student, task, dev2, pad, 2 * micro2, run.device),
                            on_eval=Keeper(student2, tok, run_dir, task.main_metric, STAGE2, state))
    run_stage(stage2, r2, run_dir.stage(STAGE2), steps2, run.device, resume=resume, extra_state={"tracker": state},
              progress=progress, echo=say)
    if run.main:
        finish(student2, tok, run_dir, task, state, echo, "stage-2 step")
    barrier()
    return run_dir.best


def _stage1(module: Distiller, recipe: Recipe, terms: dict, sets, pad: int, device) -> Stage:
    """Stage 1 (intermediate layers), scored by its loss terms on the first dev split: the head is not trained."""
    first_dev = next(ds for split, ds in sets.items() if split != "train")
    micro, pad_rows = micro_batch_size(recipe), partial(collate_batch, pad_token_id=pad)
    return labelled_stage("stage1", module, terms, sets["train"], recipe, pad,
                          lambda m: average_terms(m, first_dev, micro, pad_rows, device, recipe.precision, terms))


def _run_stage1(run: Run, stage1: Stage, recipe: Recipe, steps: int, run_dir: RunDir, tokenizer, *, resume: bool,
                progress: bool, say) -> Path:
    """Stage 1 (intermediate layers) into stage1/student, unless that exists: a finished stage 1 is not run
    again, an interrupted one resumes from its last checkpoint. Returns the student directory."""
    student_dir = run_dir.stage(STAGE1).student
    if (student_dir / "config.json").is_file():
        if not run_dir.stage(STAGE2).checkpoints():
            say(f"stage 1 finished earlier ({student_dir}); starting stage 2")
        return student_dir
    if steps:
        stage1.module.teacher.to(teacher_dtype(recipe.precision))
        run_stage(stage1, recipe, run_dir.stage(STAGE1), steps, run.device, resume=resume, progress=progress, echo=say)
    else:
        say("stage1: 0 epochs, skipped")
    if run.main:
        export(stage1.module.student, student_dir, tokenizer)
    barrier()  # every process starts stage 2 from the exported student
    return student_dir




# ------------------------------------------------------------------------------------------------------- evaluation


GLUE_FILE_NAMES = {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}


def run_eval(data: TaskSource, model: str, *, split: str = "dev", max_seq_length: int | None = None,
             batch_size: int = 64, max_examples: int = 0, predictions: Path | None = None,
             submission_dir: Path | None = None) -> dict:
    """Score `model` on the task's dev splits, or predict its test splits and write GLUE submission files.

    Returns {"model", "task", "split", "results": {split: {"examples": N, metric: value, ...}}}; for test splits the
    results hold the submission file instead of metrics. predictions: a TSV of split, idx, prediction, label."""
    from tinybert.metrics import compute_metrics

    if split not in ("dev", "test"):
        raise DataError(f"--split {split!r}: use dev or test")
    task, raw = data.load((split,), max_eval=max_examples)
    bert = load_model(model)
    check_head(bert, task, f"model {model}")
    tok = load_tokenizer(model, vocab_size=bert.config.vocab_size)
    device = default_device()
    bert.to(device)
    tokenized = tokenize(datasets.DatasetDict(raw), tok, max_seq_length or task.max_seq_length)
    results, lines = {}, []
    for name, ds in tokenized.items():
        preds = to_predictions(predict(bert, ds, tok.pad_token_id, batch_size, device), task)
        labels = np.asarray(list(ds["labels"]))
        if split == "dev":
            results[name] = {"examples": len(ds), **compute_metrics(task, preds, labels)}
        else:
            file = (submission_dir or Path("submission")) / f"{GLUE_FILE_NAMES.get(name, task.glue_dir)}.tsv"
            results[name] = {"examples": len(ds), "submission": str(write_submission(task, preds, file, ds["idx"]))}
        gold = labels if split == "dev" else [""] * len(ds)
        lines += [f"{name}\t{i}\t{p}\t{label}" for i, p, label in zip(ds["idx"], preds, gold)]
    if predictions is not None:
        predictions = Path(predictions)
        predictions.parent.mkdir(parents=True, exist_ok=True)
        predictions.write_text("split\tidx\tprediction\tlabel\n" + "".join(line + "\n" for line in lines))
    return {"model": str(model), "task": task.name, "split": split, "results": results}


def format_results(report: dict) -> str:
    """The metrics table `tinybert eval` prints."""
    rows = list(report["results"].items())
    keys = [k for k in rows[0][1] if k != "examples"]
    header = ["task", "split", "examples", *keys]
    table = [[report["task"], name, str(r["examples"]),
              *[f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys]] for name, r in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *table)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *table])
