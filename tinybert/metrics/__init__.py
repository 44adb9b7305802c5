"""Task metrics: `compute_metrics` runs the GLUE `evaluate` module shipped beside this file (glue.py), loaded by
path so it works offline; `main_metric` names the number that picks the best checkpoint (paper Table 1).
"""

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinybert.data import TASKS, TaskSpec, get_task

GLUE_METRIC = Path(__file__).with_name("glue.py")


@functools.lru_cache(maxsize=None)
def load_metric(config_name: str):
    """The `evaluate` GLUE metric for one task, loaded from the file in this package (no hub access)."""
    import evaluate  # slow import; only when a metric is needed

    # keep_in_memory: no Arrow cache files or locks under ~/.cache for a few thousand numbers.
    return evaluate.load(str(GLUE_METRIC), config_name, keep_in_memory=True)


def _config_name(task: TaskSpec) -> str:
    if task.name in TASKS:
        return task.name
    # A custom task is scored like the GLUE task with the same metrics (accuracy: sst2, accuracy+F1: mrpc, ...).
    for glue in TASKS.values():
        if glue.metrics == task.metrics and glue.is_regression == task.is_regression:
            return glue.name
    raise ValueError(f"no GLUE metric configuration computes {task.metrics}")


def compute_metrics(task: str | TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Score predictions (class ids, or scores for regression) against references.

    Returns {metric: value} with the task's metrics, e.g. mrpc -> {'accuracy': .., 'f1': ..}, stsb ->
    {'pearson': .., 'spearmanr': ..}, cola -> {'matthews_correlation': ..}.
    """
    task = get_task(task) if isinstance(task, str) else task
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.shape[0]} predictions but {references.shape[0]} references")
    result = load_metric(_config_name(task)).compute(predictions=predictions, references=references)
    return {name: float(value) for name, value in result.items()}


def main_metric(task: str | TaskSpec) -> str:
    """The metric that picks the best checkpoint: matthews_correlation (cola), f1 (mrpc, qqp), spearmanr (stsb),
    accuracy (the rest)."""
    return (get_task(task) if isinstance(task, str) else task).main_metric
