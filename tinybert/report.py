"""Training reports from a run's log.jsonl: PNG plots of every loss term (held-out values over the training curve),
the learning rate and the other schedule values, every evaluation metric, and a short Markdown summary beside them.

Plots are drawn on `matplotlib.figure.Figure` objects, not through pyplot, so no global backend or figure state is
touched (the Agg canvas writes the PNGs, with no display needed).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

from tinybert import rundir
from tinybert.rundir import STAGE1, STAGE2, RunDir, is_finite_number

SCHEDULE = {"lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
            "tokens_per_s": "throughput (tokens/s)"}
NOT_PLOTTED = ("stage", "kind", "step", "epoch")


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message says which file and why."""


def read_log(path: Path) -> list[dict]:
    """log.jsonl records (rundir.read_log: a torn last line is skipped, any other line that is not JSON is an
    error naming it)."""
    try:
        return rundir.read_log(path)[0]
    except ValueError as e:
        raise ReportError(str(e)) from None


def read_recipe(path: Path) -> dict | None:
    """A run's recipe.yaml: None when it is missing or holds no mapping; ValueError, naming it, when it is no YAML."""
    import yaml

    if not path.is_file():
        return None
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return recipe if isinstance(recipe, dict) else None


def _keys(records: list[dict], exclude=()) -> list[str]:
    """Numeric keys in order of first appearance, `loss` (the weighted sum) first."""
    keys = dict.fromkeys(k for r in records for k, v in r.items()
                         if k not in NOT_PLOTTED and k not in exclude and is_finite_number(v))
    return sorted(keys, key=lambda k: k != "loss")


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = sorted((r["step"], float(r[key])) for r in records
                    if is_finite_number(r.get(key)) and is_finite_number(r.get("step")))
    return [s for s, _ in points], [v for _, v in points]


def _ema(values: list[float], span: int) -> list[float]:
    alpha = 2 / (span + 1)
    return list(itertools.accumulate(values, lambda avg, v: alpha * v + (1 - alpha) * avg))


def _figure(path: Path, title: str, keys: list[str], draw):
    """A PNG with one panel per key, two a row, each drawn by `draw(ax, key)`."""
    from matplotlib.figure import Figure

    cols = 1 if len(keys) == 1 else 2
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5.5 * cols, 3.4 * rows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=13)
    for ax, key in zip(axes, keys):
        draw(ax, key)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    fig.savefig(path)


def _log_scale_helps(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) >= 10


def _draw_loss(ax, key: str, train: list[dict], evals: list[dict]):
    steps, values = _series(train, key)
    shown = list(values)
    if len(values) > 20:  # noisy per-step values faint, their moving average on top
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        ax.plot(steps, _ema(values, max(5, len(values) // 50)), color="tab:blue", linewidth=1.6,
                label="train (moving average)")
    elif values:
        ax.plot(steps, values, color="tab:blue", marker=".", linewidth=1.4, label="train")
    e_steps, e_values = _series(evals, key)
    if e_values:
        ax.plot(e_steps, e_values, color="tab:orange", marker="o", linewidth=1.2, label="held-out")
        shown += e_values
    if _log_scale_helps(shown):
        ax.set_yscale("log")
    ax.set_title("loss (weighted sum of the terms)" if key == "loss" else f"{key} loss")
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.legend(fontsize=8)


def _draw_line(ax, key: str, records: list[dict], titles: dict, marker: str | None = None):
    steps, values = _series(records, key)
    ax.plot(steps, values, color="tab:green", marker=marker, linewidth=1.4)
    ax.set_title(titles.get(key, key))
    ax.set_ylabel(titles.get(key, key))
    if key == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _table(records: list[dict], keys: list[str]) -> list[str]:
    lines = ["| value | first | last | min (step) | max (step) |", "|---|---|---|---|---|"]
    for key in keys:
        steps, values = _series(records, key)
        if not values:
            continue
        lo, hi = values.index(min(values)), values.index(max(values))
        lines.append(f"| {key} | {values[0]:.4g} | {values[-1]:.4g} | {values[lo]:.4g} ({steps[lo]}) | "
                     f"{values[hi]:.4g} ({steps[hi]}) |")
    return lines


def _recipe_lines(run_dir: Path) -> list[str]:
    try:
        recipe = read_recipe(RunDir(run_dir).recipe)
    except ValueError:
        return ["(recipe.yaml could not be read)", ""]
    if recipe is None:
        return []
    keys = ["recipe", "teacher", "student", "model", "corpus", "task", "augmented", "layer_map", "terms",
            "batch_size", "max_seq_length", "learning_rate", "max_steps", "epochs", "precision"]

    def shown(value):
        if isinstance(value, list) and not all(isinstance(v, int) for v in value):
            return ", ".join(f"`{v}`" for v in value)
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in value.items())
        return f"`{value}`"

    def lines(recipe: dict, indent: str) -> list[str]:
        chosen = keys + (["prediction", "temperature"] if "prediction" in (recipe.get("terms") or {}) else [])
        return [f"{indent}- {k}: {shown(recipe[k])}" for k in chosen if recipe.get(k) not in (None, "", [], {})]

    out = lines(recipe, "")
    for stage, sub in recipe.items():  # a task distillation's recipe.yaml holds one recipe per stage
        if isinstance(sub, dict) and stage in (STAGE1, STAGE2):
            out += [f"- {stage}:"] + lines(sub, "  ")
    return out + [""]


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the plots and report.md for `run_dir` into `out` (default RUN_DIR/report); returns report.md's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    logs = RunDir(run_dir).logs()
    if not logs:
        raise ReportError(f"{run_dir} has no log.jsonl; give a run directory written by tinybert distill or finetune")
    records = [r for log in logs for r in read_log(log)]
    if not records:
        raise ReportError(f"{', '.join(map(str, logs))}: no records; the run logged no step yet")
    out = Path(out) if out is not None else RunDir(run_dir).report
    out.mkdir(parents=True, exist_ok=True)
    run = run_dir.resolve().name

    md = [f"# Training report: {run}", "", f"Run directory `{run_dir}`.", ""] + _recipe_lines(run_dir)
    for stage in dict.fromkeys(r.get("stage", "run") for r in records):
        mine = [r for r in records if r.get("stage", "run") == stage]
        train = [r for r in mine if r.get("kind", "train") == "train"]
        evals = [r for r in mine if r.get("kind") == "eval"]
        loss_keys = _keys(train, exclude=SCHEDULE)
        schedule_keys = [k for k in SCHEDULE if any(is_finite_number(r.get(k)) for r in train)]
        eval_keys = _keys(evals)
        steps = [r["step"] for r in train if is_finite_number(r.get("step"))]
        epochs = [r["epoch"] for r in train if is_finite_number(r.get("epoch"))]
        md += [f"## {stage}", "",
               f"{len(train)} training steps" + (f" (steps {min(steps)} to {max(steps)}" if steps else "")
               + (f", epochs {min(epochs)} to {max(epochs)})" if epochs else (")" if steps else ""))
               + f", {len(evals)} evaluations.", ""]
        figures = [("losses", "loss terms", loss_keys, lambda ax, key: _draw_loss(ax, key, train, evals)),
                   ("schedule", "learning rate and schedule", schedule_keys,
                    lambda ax, key: _draw_line(ax, key, train, SCHEDULE)),
                   ("eval", "evaluation metrics", eval_keys, lambda ax, key: _draw_line(ax, key, evals, {}, "o"))]
        for kind, title, keys, draw in figures:
            if keys:
                _figure(out / f"{stage}-{kind}.png", f"{run} - {stage}: {title}", keys, draw)
        if loss_keys:
            md += ["Training loss terms:", ""] + _table(train, loss_keys) + [""]
        if eval_keys:
            last = evals[-1]
            md += [f"Final evaluation (step {last.get('step')}):", "", "| metric | value |", "|---|---|"]
            md += [f"| {k} | {last[k]:.4g} |" for k in eval_keys if is_finite_number(last.get(k))] + [""]
            md += ["All evaluations:", ""] + _table(evals, eval_keys) + [""]
        md += [f"![{stage}: {title}]({stage}-{kind}.png)" for kind, title, keys, _ in figures if keys] + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
