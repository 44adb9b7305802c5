"""GLUE metrics as an `evaluate` module, shipped inside tinybert so it loads by path with no hub access.

Config name = GLUE task name. Same metrics and result keys as the hub's `glue` metric (Wang et al., 2019; TinyBERT
Table 1): accuracy; accuracy and F1 (mrpc, qqp); Matthews correlation (cola); Pearson and Spearman (stsb).
Self-contained on purpose: `evaluate.load` copies this one file into its module cache, so it imports no tinybert.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}

_DESCRIPTION = "GLUE benchmark metrics, one configuration per task."
_CITATION = """@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={ICLR}, year={2019}
}"""
_INPUTS = """
predictions: class ids (int) or, for stsb, scores (float); references: the gold labels, same type.
Returns a dict: accuracy, f1 (binary, positive class 1), matthews_correlation, pearson, spearmanr as the task has.
"""


class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name not in METRICS:
            raise KeyError(f"unknown GLUE configuration {self.config_name!r}; one of {', '.join(METRICS)}")
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            # No format="numpy": datasets' numpy formatter turns float64 into float32, which would cost stsb precision.
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        out = {}
        for name in METRICS[self.config_name]:
            if name == "accuracy":
                out[name] = float((predictions == references).mean())
            elif name == "f1":
                out[name] = float(f1_score(references, predictions))
            elif name == "matthews_correlation":
                out[name] = float(matthews_corrcoef(references, predictions))
            elif name == "pearson":
                out[name] = float(pearsonr(predictions, references)[0])
            elif name == "spearmanr":
                out[name] = float(spearmanr(predictions, references)[0])
        return out
