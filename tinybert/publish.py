"""Publishing a student: a model card (README.md with Hugging Face metadata) built from the runs that made it, and a
push to the Hub, or any server that speaks its API, through `huggingface_hub.HfApi`.

The card states what a reader needs to trust and reuse the model: its teacher, each distillation stage with its
recipe (layer map, loss weights and modes, temperature, data), evaluation results, size and measured speed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tinybert.checkpoint import CheckpointError, load_model, read_config
from tinybert.losses import LAYER_TERMS, LOSS_TERMS
from tinybert.report import read_log, read_recipe
from tinybert.rundir import BENCH, BEST, LAST, STAGE1, STAGE2, STUDENT, Bench, Metrics, RunDir, is_finite_number

STAGE_TITLES = {
    "general": "General distillation (TinyBERT section 3.2, on raw text)",
    "stage1": "Task distillation, stage 1: intermediate layers",
    "stage2": "Task distillation, stage 2: prediction layer",
    "finetune": "Fine-tuning",
}
# The stages a recipe runs, for runs whose log.jsonl is missing.
RECIPE_STAGES = {"general": ("general",), "task": (STAGE1, STAGE2), "finetune": ("finetune",)}
# Recipe keys that say which data a stage saw (those of future recipes are shown as they come).
DATA_KEYS = ("corpus", "task", "data_dir", "train_file", "validation_file", "dataset")
GLUE_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
              "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
METRIC_TYPES = {"pearson": "pearsonr"}  # our result keys -> the Hub's metric ids, where they differ
METRIC_NAMES = {"accuracy": "Accuracy", "f1": "F1", "matthews_correlation": "Matthews correlation",
                "pearson": "Pearson", "pearsonr": "Pearson", "spearmanr": "Spearman"}
CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"  # Jinja, filled by model_card


class PushError(ValueError):
    """A push that cannot start or did not finish; the message is one line and never holds the token."""


# ------------------------------------------------------------------------------------------------- run records


@dataclass
class RunRecord:
    """One run directory: the resolved recipe (with teacher/student/corpus) and its log records."""

    path: Path
    recipe: dict
    records: list[dict]
    metrics: Metrics | None  # metrics.json of a fine-tuning or task-distillation run

    def recipe_for(self, stage: str) -> dict:
        """The recipe of one stage: a task distillation's recipe.yaml holds one per stage (stage1:, stage2:) beside
        the keys they share (teacher, student, task, augmented)."""
        if isinstance(self.recipe.get(stage), dict):
            shared = {k: v for k, v in self.recipe.items() if k not in RECIPE_STAGES["task"]}
            return {**shared, **self.recipe[stage]}
        return self.recipe

    @property
    def stages(self) -> list[str]:
        logged = dict.fromkeys(r["stage"] for r in self.records if r.get("stage"))
        return list(logged) or list(RECIPE_STAGES.get(self.recipe.get("recipe"), ()))


def read_run(path: str | os.PathLike) -> RunRecord:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"run directory {path} does not exist")
    run_dir = RunDir(path)
    logs = run_dir.logs()
    if not run_dir.recipe.is_file() and not logs:
        raise ValueError(f"{path} holds neither recipe.yaml nor log.jsonl; give a run directory written by "
                         f"tinybert distill or finetune")
    recipe = read_recipe(run_dir.recipe) or {}
    metrics = Metrics.read(run_dir.metrics) if run_dir.metrics.is_file() else None
    return RunRecord(path, recipe, [r for log in logs for r in read_log(log)], metrics)


def _run_of(directory: Path) -> Path | None:
    """The run a model directory was exported into: RUN/student, RUN/best, RUN/last, RUN/stage1/student."""
    return next((p for p in list(directory.resolve().parents)[:2] if RunDir(p).recipe.is_file()), None)


def _default_runs(model_dir: Path) -> list[RunRecord]:
    """The runs behind a model, oldest first: the run it was exported by, and, while the model a run started from
    (`student`, or `model` for fine-tuning) is a local export of another run, that run too (general distillation
    -> task distillation -> fine-tuning)."""
    runs, run = [], _run_of(model_dir)
    while run is not None and run not in [r.path for r in runs] and len(runs) < 8:
        runs.insert(0, read_run(run))
        start = runs[0].recipe.get("student") or runs[0].recipe.get("model")
        run = _run_of(Path(start)) if isinstance(start, str) and Path(start).is_dir() else None
    return runs


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class Result:
    task: str
    split: str
    metrics: dict[str, float]
    dataset: str | None = None  # a hub dataset id when known
    source: str | None = None  # where the figures come from, for the card's reader


SPLIT_NAMES = ("train", "validation", "validation_matched", "validation_mismatched", "dev", "eval", "test")


def normalise_results(raw, *, task: str | None = None, split: str = "validation") -> list[Result]:
    """Evaluation results in the shapes task runs and users write them:
    {"accuracy": 0.9}, {"task": "sst2", "split": "validation", "metrics": {...}}, {"sst2": {"accuracy": 0.9}},
    {"validation": {"accuracy": 0.9}}, a list of any of these, or a JSON file path holding one."""
    if raw is None:
        return []
    if isinstance(raw, (str, os.PathLike)):
        path = Path(raw)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"results file {path}: {type(e).__name__}: {e}") from None
    if isinstance(raw, list):
        return [r for item in raw for r in normalise_results(item, task=task, split=split)]
    if not isinstance(raw, dict):
        raise ValueError(f"evaluation results must be a mapping or a list of mappings, not {type(raw).__name__}")
    task = str(raw.get("task", task) or "custom")
    split = str(raw.get("split", split))
    dataset = raw.get("dataset") if isinstance(raw.get("dataset"), str) else None
    if isinstance(raw.get("metrics"), dict):
        found = {k: float(v) for k, v in raw["metrics"].items() if is_finite_number(v)}
        return [Result(task, split, found, dataset)] if found else []
    flat = {k: float(v) for k, v in raw.items() if is_finite_number(v) and k not in ("step", "epoch")}
    results = [Result(task, split, flat, dataset)] if flat else []
    for key, value in raw.items():  # nested: {"validation": {...}} or {"sst2": {...}}
        if isinstance(value, dict) and key in SPLIT_NAMES:
            results += normalise_results(value, task=task, split=key)
        elif isinstance(value, dict):
            results += normalise_results({"task": key, "split": split, **value}, task=key, split=split)
    return results


def _dev_split(task: str) -> str:
    from tinybert.data import TASKS  # datasets and torch: only for the metrics that name no split

    return TASKS[task.lower()].dev_splits[0] if task.lower() in TASKS else "validation"


def run_results(run: RunRecord, model_dir: Path) -> list[Result]:
    """The scores of `model_dir` in its run's metrics.json: the record of last/ for last/, else best/'s. Metrics of
    a second dev split are keyed "split/metric" (MNLI mismatched)."""
    m = run.metrics
    if m is None:
        return []
    which = LAST if model_dir.resolve().name == LAST else BEST
    chosen = (m.last if which == LAST else m.best) or {}
    task = str(m.task or run.recipe.get("task") or "custom")
    source = f"the {which} checkpoint ({chosen.get('stage', 'run')} step {chosen.get('step', '?')}), metrics.json"
    by_split: dict[str, dict[str, float]] = {}
    for key, value in chosen.items():
        if is_finite_number(value) and key not in ("step", "epoch", "loss"):
            split, _, name = key.rpartition("/")
            by_split.setdefault(split or _dev_split(task), {})[name] = float(value)
    return [Result(task, split, metrics, source=source) for split, metrics in by_split.items()]


def _eval_result(result: Result, metric: str, value: float):
    from huggingface_hub import EvalResult

    task = result.task.lower()
    glue = task in GLUE_NAMES
    return EvalResult(
        task_type="text-classification", task_name="Text Classification",
        dataset_type=result.dataset or ("nyu-mll/glue" if glue else result.task),
        dataset_name=f"GLUE {GLUE_NAMES[task]}" if glue else result.task, dataset_config=task if glue else None,
        dataset_split=result.split, metric_type=METRIC_TYPES.get(metric, metric), metric_value=round(value, 4),
        metric_name=METRIC_NAMES.get(metric, metric),
    )


# ------------------------------------------------------------------------------------------------------ bench


def read_bench(bench) -> dict | None:
    """The card's view of a bench result (a `rundir.Bench`, the path of a bench.json, or its dict; see
    `Bench.read`): the figures of each side, the speed-ups (from the sides where the file gives none) and the
    conditions of the measurement."""
    if bench is None:
        return None
    if not isinstance(bench, Bench):
        bench = Bench.read(bench)

    def side(s):
        figures = {"p50": s.latency_ms_p50, "p95": s.latency_ms_p95, "throughput": s.throughput_seq_per_s,
                   "params": s.parameters}
        return {"name": s.model, **{k: None if x is None else float(x) for k, x in figures.items()}}

    model, vs = side(bench.model), bench.vs and side(bench.vs)
    given = bench.speedup or {}
    speedup = {"latency": given.get("latency_speedup"), "throughput": given.get("throughput_speedup")}
    if speedup["latency"] is None and vs and model["p50"] and vs["p50"]:
        speedup["latency"] = vs["p50"] / model["p50"]
    if speedup["throughput"] is None and vs and model["throughput"] and vs["throughput"]:
        speedup["throughput"] = model["throughput"] / vs["throughput"]
    where = {**dataclasses.asdict(bench.model), **(bench.machine or {})}
    labels = {"device": "device", "dtype": "precision", "seq_len": "sequence length",
              "throughput_batch": "throughput batch", "threads": "threads", "cpu": "CPU", "gpu": "GPU",
              "date": "measured"}
    setting = {label: where[key] for key, label in labels.items() if where.get(key) not in (None, "")}
    return {"model": model, "vs": vs, "speedup": speedup, "setting": setting}


# ------------------------------------------------------------------------------------------------------- card


def _hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id and is no local path, else None (metadata needs real Hub ids). A run
    given a hub id records the model's folder in the hub cache; its repo id is read back from that."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from tinybert.download import hub_snapshot

    if not name:
        return None
    if snapshot := hub_snapshot(name):
        return snapshot[0]
    name = str(name)
    if Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return None  # a local path, or no OWNER/NAME
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _count_parameters(directory: str | os.PathLike) -> int | None:
    """Parameters stored in a checkpoint's safetensors, from the header only (no weights are read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(directory) / "model.safetensors"), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception:  # a missing or unreadable teacher only costs the card one figure
        return None


def _millions(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f}M"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _md_link(name: str) -> str:
    hub = _hub_id(name)
    return f"[`{hub}`](https://huggingface.co/{hub})" if hub else f"`{name}`"


def _stage_terms(run: RunRecord, stage: str) -> dict[str, float]:
    """The loss terms a stage trained, as logged, with the recipe's weights (without a log: the recipe's terms
    that the stage runs)."""
    weights = run.recipe_for(stage).get("terms") or {}
    logged = [t for t in LOSS_TERMS if any(r.get("stage") == stage and t in r for r in run.records)]
    if not run.records:
        logged = ["prediction"] if stage == STAGE2 else [t for t in weights if t != "prediction"]
    return {t: weights.get(t, 1.0) for t in logged}


def _uniform_map(teacher: str | None, student_layers: int) -> list[int] | None:
    """The explicit list behind `layer_map: uniform`, when the teacher is a local checkpoint to count layers in."""
    from tinybert.losses import LayerMapError, uniform_layer_map

    try:
        return uniform_layer_map(read_config(teacher).num_hidden_layers, student_layers) if teacher else None
    except (CheckpointError, LayerMapError):  # no local checkpoint
        return None


def _shown(value) -> str:
    return ", ".join(f"`{v}`" for v in value) if isinstance(value, list) else f"`{value}`"


def _stage_lines(run: RunRecord, stage: str, student_layers: int) -> list[str]:
    recipe = run.recipe_for(stage)
    starts = {"teacher": "teacher", "student": "initial student", "model": "initial model"}
    lines = [f"{label}: {_md_link(recipe[key])}" for key, label in starts.items() if recipe.get(key)]
    terms = _stage_terms(run, stage)
    if stage == "finetune":  # the loop logs fine-tuning's loss on the gold labels as its `prediction` term
        terms = {}
        lines.append("loss: cross-entropy on the gold labels (MSE for regression)")
    lines += [f"{'data' if key == 'corpus' else key.replace('_', ' ')}: {_shown(recipe[key])}"
              for key in DATA_KEYS if recipe.get(key)]
    lines += [f"{key.replace('_', ' ')}: `{value}`" for key, value in recipe.items()
              if "augment" in key and value not in (None, False, "")]
    if any(t in terms for t in LAYER_TERMS) and recipe.get("layer_map") is not None:
        layer_map = recipe["layer_map"]
        if layer_map == "uniform":
            layer_map = _uniform_map(recipe.get("teacher"), student_layers) or layer_map
        shown = f"`{layer_map}`" if isinstance(layer_map, list) else f"{layer_map} ({student_layers} student layers)"
        lines.append(f"layer map (student state j <- teacher state map[j], 0 = embeddings): {shown}")
    if terms:
        lines.append("loss terms (weight): " + ", ".join(f"{t} {_fmt(float(w))}" for t, w in terms.items()))
    if "attention" in terms and recipe.get("attention_mode"):
        lines.append(f"attention loss: MSE of pre-softmax scores, mode `{recipe['attention_mode']}`")
    if ("hidden" in terms or "embedding" in terms) and "shared_projection" in recipe:
        lines.append(f"hidden-state projections: {'one shared' if recipe['shared_projection'] else 'one per layer'}"
                     f" (trained with the student, not exported)")
    if "prediction" in terms:
        lines.append(f"prediction loss: `{recipe.get('prediction', 'soft')}`, temperature "
                     f"{_fmt(recipe.get('temperature', 1.0))}, soft mode `{recipe.get('soft_mode', 'original')}`")
    train = [r for r in run.records if r.get("stage") == stage and r.get("kind") == "train"]
    steps = max((r.get("step", 0) for r in train), default=None)
    optim = [f"{steps:,} steps" if steps else None,
             f"batch {recipe['batch_size']}" if "batch_size" in recipe else None,
             f"sequence length {recipe['max_seq_length']}" if "max_seq_length" in recipe else None,
             f"learning rate {_fmt(recipe['learning_rate'])}" if "learning_rate" in recipe else None,
             f"{recipe['scheduler']} schedule, warmup {_fmt(recipe.get('warmup_ratio', 0))}"
             if "scheduler" in recipe else None,
             f"{recipe['precision']}" if "precision" in recipe else None,
             f"seed {recipe['seed']}" if "seed" in recipe else None]
    if any(optim):
        lines.append("optimisation: " + ", ".join(x for x in optim if x))
    if train and is_finite_number(train[-1].get("loss")):
        last = train[-1]
        parts = [f"{t} {_fmt(last[t])}" for t in terms if is_finite_number(last.get(t))]
        lines.append(f"last training loss: {_fmt(last['loss'])}" + (f" ({', '.join(parts)})" if parts else ""))
    evals = [r for r in run.records if r.get("stage") == stage and r.get("kind") == "eval"]
    if evals:
        values = ", ".join(f"{k} {_fmt(v)}" for k, v in evals[-1].items()
                           if is_finite_number(v) and k not in ("step", "epoch"))
        lines.append(f"last held-out evaluation (step {evals[-1].get('step')}): {values}")
    return lines


def model_card(model_dir: str | os.PathLike, *, run_dirs: list[str | os.PathLike] | None = None, results=None,
               bench=None, license: str = "apache-2.0", repo_id: str | None = None, base_model: str | None = None,
               onnx: str | os.PathLike | None = None) -> str:
    """README.md text for an exported student: Hub metadata (license, base_model = the teacher, tags, datasets,
    metrics, model-index) in YAML front matter, then lineage, evaluation, size and speed, and usage, laid out by
    CARD_TEMPLATE; this function gathers the facts.

    run_dirs: the runs that made the model, in order (default: the run whose `student/` this is); their
    recipe.yaml, log.jsonl and metrics.json are read. results: evaluation results (see `normalise_results`),
    added to those of the runs' metrics.json. bench: a bench dict or JSON file (see `read_bench`; default
    MODEL_DIR/bench.json when there is one). onnx: an ONNX export folder (`tinybert export`) to describe in an
    "ONNX" section as the repo's onnx/ subfolder (default: MODEL_DIR/onnx when it holds one; see `onnx_dir`).
    """
    from huggingface_hub import ModelCard

    model_dir = Path(model_dir)
    model = load_model(model_dir)
    config = model.config
    runs = [read_run(d) for d in run_dirs] if run_dirs is not None else _default_runs(model_dir)
    last = runs[-1].recipe if runs else {}
    teacher = last.get("teacher")  # of the run that produced this model
    origin = teacher or last.get("model")  # a fine-tuning run starts from a model, with no teacher
    base_model = base_model or _hub_id(origin)

    # Scores are those of the run that produced this model; earlier runs scored other models.
    found = run_results(runs[-1], model_dir) if runs else []
    found = [r for r in found + normalise_results(results) if r.metrics]
    if bench is None and (model_dir / BENCH).is_file():  # where `tinybert bench MODEL` writes by default
        bench = model_dir / BENCH
    bench = read_bench(bench) or {}

    name = (repo_id or model_dir.resolve().name).split("/")[-1]
    if name in (STUDENT, BEST, LAST) and runs:  # RUN/best: the run names the model
        name = runs[-1].path.resolve().name
    total = model.num_parameters()["total"]
    export = onnx_dir(model_dir, onnx)
    card = ModelCard.from_template(
        _card_data(config, runs, found, name, license=license, base_model=base_model),
        template_path=str(CARD_TEMPLATE), name=name, params=_millions(total), config=config,
        teacher=teacher and _md_link(teacher), origin=origin and _md_link(origin),
        local_origin=origin if origin and not base_model else None,
        runs=runs, stages=[(STAGE_TITLES.get(s, s), _stage_lines(run, s, config.num_hidden_layers))
                           for run in runs for s in run.stages],
        sources="; ".join(dict.fromkeys(r.source for r in found if r.source)),
        results=[[GLUE_NAMES.get(r.task.lower(), r.task), r.split, METRIC_NAMES.get(k, k), f"{x:.4f}"]
                 for r in found for k, x in r.metrics.items()],
        **_size_facts(bench, total, teacher),
        setting=", ".join(f"{k} {_fmt(x)}" for k, x in bench.get("setting", {}).items()),
        repo=repo_id or str(model_dir),
        onnx=_onnx_section(export, repo_id) if export else None,
    )
    return str(card)


def _card_data(config, runs: list[RunRecord], found: list[Result], name: str, *, license: str,
               base_model: str | None):
    """The card's Hub metadata: license, base model, tags, datasets (hub ids only), metrics and model-index."""
    from huggingface_hub import ModelCardData

    datasets = []
    for run in runs:
        datasets += [d for d in (run.recipe.get("corpus") or []) + [run.recipe.get("dataset")] if _hub_id(d)]
        datasets += ["nyu-mll/glue"] if str(run.recipe.get("task", "")).lower() in GLUE_NAMES else []
    for r in found:
        hub = r.dataset or ("nyu-mll/glue" if r.task.lower() in GLUE_NAMES else None)
        datasets += [hub] if _hub_id(hub) else []
    datasets = list(dict.fromkeys(datasets))
    metric_names = list(dict.fromkeys(METRIC_TYPES.get(m, m) for r in found for m in r.metrics))
    return ModelCardData(
        license=license, base_model=base_model, library_name="transformers",
        pipeline_tag="text-classification" if config.num_labels else "feature-extraction",
        tags=["tinybert", "distillation", "bert"] + (["text-classification"] if config.num_labels else []),
        datasets=datasets or None, metrics=metric_names or None, model_name=name if found else None,
        eval_results=[_eval_result(r, m, v) for r in found for m, v in r.metrics.items()] or None,
    )


def _size_facts(bench: dict, total: int, teacher: str | None) -> dict:
    """The card's size-and-speed table: this model, and the model the bench compared it with (usually the teacher),
    else the teacher unmeasured; the speed-up line; how many times fewer parameters."""
    m, v = bench.get("model") or {}, bench.get("vs") or {}
    figures = lambda side: [_fmt(side.get(k) or "-") for k in ("p50", "p95", "throughput")]  # noqa: E731
    sizes = [["this model", _millions(total), *figures(m)]]
    reference, reference_params = None, None
    if v or teacher:  # without a measured reference, the teacher's row has only its size
        is_teacher = v.get("name") in (None, teacher)
        reference = "the teacher" if is_teacher else f"`{v['name']}`"
        reference_params = v.get("params") or (_count_parameters(teacher) if is_teacher and teacher else None)
        sizes.append([reference, _millions(reference_params) if reference_params else "-", *figures(v)])
    speedup = bench.get("speedup") or {}
    speedup = [f"**{speedup['latency']:.2f}x** lower p50 latency (batch 1)" if speedup.get("latency") else None,
               f"**{speedup['throughput']:.2f}x** higher throughput" if speedup.get("throughput") else None]
    return {"sizes": sizes, "measured": bool(bench), "reference": reference,
            "speedup": ", ".join(x for x in speedup if x) if any(speedup) and reference else None,
            "fewer": f"{reference_params / total:.1f}" if reference_params else None}


# ------------------------------------------------------------------------------------------------------- onnx


def onnx_dir(model_dir: Path, onnx: str | os.PathLike | None = None) -> Path | None:
    """The ONNX export that goes with a model: `onnx` when given (it must be a `tinybert export` of this model), else
    MODEL_DIR/onnx when it holds one (where `tinybert export MODEL_DIR` writes by default), else None."""
    from tinybert.onnx_export import MODEL_FILE, RECORD_FILE, SUBFOLDER

    beside = model_dir / SUBFOLDER
    if onnx is None:
        return beside if (beside / RECORD_FILE).is_file() else None
    onnx = Path(onnx)
    if not all((onnx / f).is_file() for f in (MODEL_FILE, RECORD_FILE, "config.json")):
        raise ValueError(f"--with-onnx {onnx} is not an ONNX export (it needs {MODEL_FILE}, {RECORD_FILE} and "
                         f"config.json); make one with tinybert export {model_dir} --format onnx")
    if beside.exists() and beside.resolve() != onnx.resolve():
        raise ValueError(f"{beside} goes up with the model as {SUBFOLDER}/, so --with-onnx {onnx} cannot: remove "
                         f"one of the two")
    try:
        same = json.loads((onnx / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        same = False
    if not same:
        raise ValueError(f"--with-onnx {onnx} is the export of another model: its config.json differs from "
                         f"{model_dir}'s")
    return onnx


def _onnx_section(export: Path, repo_id: str | None) -> dict:
    """The card's "ONNX" facts: files, opset, parity, int8 score, ONNX Runtime speed and a usage snippet (that
    downloads onnx/ from the Hub repo, or, for a card without a repo id, reads the local export)."""
    from tinybert.onnx_export import INT8_FILE, SUBFOLDER, onnx_facts

    facts = onnx_facts(export, repo=repo_id, folder=str(export))
    files = [[f"`{SUBFOLDER}/{name}`", "int8 (dynamic quantisation)" if kind == "int8" else kind,
              f"{(export / name).stat().st_size / 2**20:.1f} MB" if (export / name).is_file() else "-"]
             for kind, name in facts["files"].items()]
    int8, result = None, facts["int8_eval"]
    if INT8_FILE in facts["files"].values() and result:
        task = GLUE_NAMES.get(str(result["task"]).lower(), result["task"])
        metric = METRIC_NAMES.get(result["metric"], result["metric"]).lower()
        int8 = (f"{task} dev {metric} {result['int8']:.4f} against {result['fp32']:.4f} for fp32 "
                f"({result['examples']} rows; {result['agreement']:.1%} of predictions unchanged)")
    elif INT8_FILE in facts["files"].values():
        int8 = "not measured at export (no task dev set was named or found)"
    speed, setting, bench = [], "", facts["speed"]  # a rundir.Bench
    if bench:
        ms = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        speed = [[label, ms(side.latency_ms_p50), ms(side.latency_ms_p95),
                  "-" if side.throughput_seq_per_s is None else f"{side.throughput_seq_per_s:.0f}"]
                 for label, side in (("PyTorch fp32", bench.vs), ("ONNX Runtime fp32", bench.model),
                                     ("ONNX Runtime int8", bench.int8)) if side is not None]
        where = bench.machine or {}
        parts = [("CPU", where.get("cpu")), ("threads", bench.model.threads), ("sequence length", bench.model.seq_len),
                 ("throughput batch", bench.model.throughput_batch), ("onnxruntime", where.get("onnxruntime")),
                 ("measured", where.get("date"))]
        setting = ", ".join(f"{k} {_fmt(v)}" for k, v in parts if v not in (None, ""))
    return {"files": files, "opset": facts["opset"], "output": facts["output"], "int8": int8,
            "parity": f"{facts['parity_max_abs_diff']:.1e}", "checked_on": facts["parity_checked_on"],
            "tolerance": f"{facts['parity_tolerance']:.0e}" if facts["parity_tolerance"] else None,
            "speed": speed, "setting": setting, "usage": "\n".join(facts["usage"]),
            "graph": INT8_FILE if int8 else None}


# ------------------------------------------------------------------------------------------------------- push


def _scrub(text: str, token: str | None) -> str:
    """One line, without the token, whatever a server or library put in an error."""
    line = " ".join(str(text).split())
    return line.replace(token, "***") if token else line


def _transport_errors() -> tuple[type, ...]:
    """Connection-level errors of whichever HTTP client this huggingface_hub uses."""
    errors: list[type] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            errors += [getattr(importlib.import_module(module), name) for name in names]
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _check_before_push(model_dir: Path, repo_id: str, token: str | None, endpoint: str, with_onnx) -> Path | None:
    """Everything push checks locally before any request; returns the ONNX export to upload (or None)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not model_dir.is_dir():
        raise PushError(f"{model_dir} is not a directory; give the exported model directory (e.g. RUN/student)")
    try:
        load_model(model_dir)
    except CheckpointError as e:
        raise PushError(f"{model_dir} is not an exported model: {e}") from None
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        raise PushError(f"{model_dir} has no tokenizer (tokenizer.json or vocab.txt); export the model with its "
                        f"tokenizer so that AutoTokenizer can load it")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise PushError(f"repo id {repo_id!r} is not OWNER/NAME (e.g. my-user/tinybert-sst2)")
    try:
        validate_repo_id(repo_id)
        export = onnx_dir(model_dir, with_onnx)
    except HFValidationError:
        raise PushError(f"repo id {repo_id!r} is not valid: OWNER/NAME with letters, digits, '-', '_' and '.', "
                        f"no '--' or '..', at most 96 characters") from None
    except ValueError as e:
        raise PushError(str(e)) from None
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: unset it to push")
    if not re.match(r"^https?://[^/\s]+", endpoint):
        raise PushError(f"endpoint {endpoint!r} is not an http(s) URL")
    return export


def _operations(model_dir: Path, card: str, export: Path | None = None) -> list:
    """One commit's additions: every regular file of the model folder, the card as README.md, and the files of an
    ONNX export kept elsewhere under onnx/ (MODEL_DIR/onnx goes up with the model folder). Hidden entries
    (unfinished `.tmp-` saves, caches) and the model folder's README.md are left out; a symbolic link is refused,
    so that nothing outside a folder is uploaded by way of one."""
    from huggingface_hub import CommitOperationAdd

    from tinybert.onnx_export import SUBFOLDER

    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
    folders = [(model_dir, Path())]
    if export is not None and export.resolve() != (model_dir / SUBFOLDER).resolve():
        folders.append((export, Path(SUBFOLDER)))
    for folder, prefix in folders:
        for src in sorted(folder.rglob("*")):
            rel = src.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts) or (folder == model_dir and rel == Path("README.md")):
                continue
            if src.is_symlink():
                raise PushError(f"{src} is a symbolic link; push uploads regular files only: replace it with a copy "
                                f"of the file it points to")
            if src.is_file():
                operations.append(CommitOperationAdd(path_in_repo=(prefix / rel).as_posix(),
                                                     path_or_fileobj=str(src)))
    return operations


def push(model_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, endpoint: str | None = None,
         run_dirs: list[str | os.PathLike] | None = None, results=None, bench=None, license: str = "apache-2.0",
         base_model: str | None = None, with_onnx: str | os.PathLike | None = None) -> str:
    """Upload an exported student with its model card to `repo_id` (created if missing, on branch `revision`).

    Everything that can be checked locally is checked before any request: the model directory, the repo id,
    the token (argument, HF_TOKEN, or `hf auth login`), offline mode; then the card is built. The model's files and
    the card as README.md go up in one commit (a README.md in `model_dir` is not uploaded, and nothing in
    `model_dir` is written). An ONNX export, `with_onnx` or else MODEL_DIR/onnx, goes up as onnx/ in the same
    commit and the card describes it (see `onnx_dir`). The token is sent only in the Authorization header; errors
    are re-raised `from None` so that no chained exception can carry it either. Returns the URL of the commit.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import HfHubHTTPError

    token = token or get_token()
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if token and (token in repo_id or token in endpoint):
        # Pasted in the wrong place: it would travel in URLs and land in logs and in the repository's name.
        raise PushError(f"the {'repo id' if token in repo_id else 'endpoint'} holds your Hugging Face token; give "
                        f"OWNER/NAME and a bare URL, the token goes in HF_TOKEN (and revoke it if it was shared)")
    model_dir = Path(model_dir)
    try:
        export = _check_before_push(model_dir, repo_id, token, endpoint, with_onnx)
        card = model_card(model_dir, run_dirs=run_dirs, results=results, bench=bench, license=license,
                          repo_id=repo_id, base_model=base_model, onnx=export)
        operations = _operations(model_dir, card, export)
    except PushError as e:  # every message without the token, whatever it quotes (a path, a repo id, a URL)
        raise PushError(_scrub(e, token)) from None
    except ValueError as e:
        raise PushError(f"cannot write the model card: {_scrub(e, token)}") from None

    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            step = f"create branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "upload the files"
        message = commit_message or f"Upload {'/'.join(model_dir.resolve().parts[-2:])} with tinybert"
        info = api.create_commit(repo_id=repo_id, operations=operations, revision=revision, commit_message=message)
    except _transport_errors() as e:
        raise PushError(f"cannot reach {endpoint} to {step} ({type(e).__name__}: {_scrub(e, token)}); check the "
                        f"network and --endpoint") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = {401: "the token was refused: check HF_TOKEN or run `hf auth login`; ",
                403: f"the token may not write to {repo_id}: use a token with write access to that namespace; ",
                404: f"{repo_id} or its revision was not found; "}.get(status, "")
        detail = _scrub(str(e).splitlines()[0] if str(e) else type(e).__name__, token)
        raise PushError(f"{endpoint} refused to {step} (HTTP {status}): {hint}{detail}") from None
    except ValueError as e:  # huggingface_hub's own checks (bad revision, malformed server answers)
        raise PushError(f"push to {endpoint} failed to {step}: {_scrub(e, token)}") from None
    return str(getattr(info, "commit_url", info))
