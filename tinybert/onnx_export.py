"""`tinybert export --format onnx`: a student directory -> an ONNX graph with dynamic batch and sequence axes that
ONNX Runtime serves, checked against PyTorch before anything is written, and an optional int8 copy (ONNX Runtime's
dynamic quantisation) scored against the fp32 student on the task's dev set.

The graph is traced from the `transformers` model that the directory loads as (`AutoModel`, or
`AutoModelForSequenceClassification` when there is a head) with torch's exporter (`torch.onnx.export(dynamo=True)`,
built on torch.export), because that model is what the exported directory serves as everywhere else; the parity
check compares the graph with it and with tinybert's own BERT. docs/export-and-push.md says why this exporter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinybert.checkpoint import load_model, load_tokenizer
from tinybert.rundir import BENCH, Bench

# File names as optimum writes them, so `ORTModelFor*.from_pretrained(DIR)` finds them.
MODEL_FILE, INT8_FILE, RECORD_FILE = "model.onnx", "model_quantized.onnx", "onnx_export.json"
# An export "beside the model": MODEL_DIR/onnx/, where `tinybert export` writes without --output; the model card
# lists it and `tinybert push` uploads it with the model (as onnx/ in the repo, where optimum finds it with
# subfolder="onnx").
SUBFOLDER = "onnx"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MIN_OPSET, DEFAULT_OPSET = 18, 18  # torch's exporter writes opset 18 natively; older ones go through a converter
PARITY_TOLERANCE = 1e-4  # max abs difference of ONNX Runtime fp32 against PyTorch fp32 (logits or last hidden state)
# Real sentences for the parity check, written for it: single sentences of different lengths (so the batch is
# padded) and sentence pairs (two segments, token_type_ids 0 and 1, padded).
PARITY_SENTENCES = [
    "The film is a quiet triumph.",
    "I wanted to like this, but the plot falls apart in the second hour and never recovers.",
    "Not bad.",
    "A warm, funny and surprisingly sharp look at a family that cannot stop arguing about the past.",
]
PARITY_PAIRS = [
    ("Where is the station?", "The station is two streets north of the market, next to the old bank."),
    ("The cat sat on the mat.", "A cat was sitting on a mat."),
    ("How many layers does the student have?", "Three."),
]
DEV_PARITY_ROWS = 32  # dev rows added to the parity check when a task's data is there


class ExportError(ValueError):
    """An export that cannot start or whose result fails its checks; one line, and nothing is written."""


def require_onnx(*modules: str) -> None:
    """One line naming what is missing, instead of an ImportError deep inside torch."""
    missing = [m for m in modules or ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export and serving need {', '.join(missing)}, which is not installed: "
                          f"pip install 'tinybert[onnx]'")


def session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session; threads: intra-op threads (None: ONNX Runtime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess, batch: dict) -> np.ndarray:
    """The graph's one output for a batch of torch tensors or numpy arrays (input_ids, attention_mask,
    token_type_ids)."""
    feeds = {name: np.asarray(batch[name].cpu() if torch.is_tensor(batch[name]) else batch[name], dtype=np.int64)
             for name in INPUTS}
    return sess.run(None, feeds)[0]


# ------------------------------------------------------------------------------------------------------ checks


def check_output(output: Path, source: Path, overwrite: bool) -> None:
    if output.exists() and output.resolve() == source.resolve():
        raise ExportError(f"--output {output} is the model directory itself; export into another folder")
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        held = [n for n in (MODEL_FILE, "config.json", "model.safetensors", "pytorch_model.bin")
                if (output / n).exists()]
        what = f"holds a model ({', '.join(held)})" if held else "already holds files"
        raise ExportError(f"--output {output} {what}; choose an empty folder or pass --overwrite")


def check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f"--opset {opset} is not supported: torch's ONNX exporter writes opsets {MIN_OPSET} to "
                          f"{newest} (onnx {onnx.__version__}); the default is {DEFAULT_OPSET}")


# ------------------------------------------------------------------------------------------------------ export


class Served(nn.Module):
    """The transformers model with the graph's three inputs in order and its one output: `logits` when the model has
    a head, else `last_hidden_state`."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out[self.output]


def load_served(model_dir: Path, has_head: bool) -> Served:
    import transformers
    from transformers import AutoModel, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if has_head else AutoModel
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(str(model_dir)).eval()
    finally:
        if bar:
            transformers.utils.logging.enable_progress_bar()
    return Served(model, "logits" if has_head else "last_hidden_state")


@contextlib.contextmanager
def _quiet():
    """torch's exporter and ONNX Runtime's quantiser talk a lot (progress lines, warnings about torchvision, a hint
    to pre-process); the command prints its own summary."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as devnull:
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
            devnull.close()


def trace(served: Served, example: dict, path: Path, opset: int, external_data: bool) -> None:
    """torch.onnx.export (torch.export-based) with batch and sequence dynamic on every input."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    args = tuple(example[name] for name in INPUTS)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(served, args, str(path), input_names=list(INPUTS), output_names=[served.output],
                              dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUTS},
                              opset_version=opset, dynamo=True, external_data=external_data, verbose=False)
    except Exception as e:  # the exporter raises many types; the first line says what (TINYBERT_TRACEBACK=1: all)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {first}") from e


def quantize_int8(fp32: Path, int8: Path, external_data: bool) -> None:
    """Dynamic quantisation: int8 weights per output channel for every MatMul (the linear layers), activations
    quantised per batch at run time; the embeddings stay fp32 (quantising their Gather costs agreement with fp32).
    Per-channel scales keep >= 99% of SST-2 dev predictions equal to fp32's, per-tensor ones about 98%."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], use_external_data_format=external_data)


def parity_batches(tokenizer, dev=None, pad_token_id: int = 0) -> list[tuple[str, dict]]:
    """(name, batch) pairs the export is checked on: padded single sentences, a padded batch of two segments, and
    the first dev rows of the task when its data is there."""
    batches = [("sentences", dict(tokenizer(PARITY_SENTENCES, padding=True, return_tensors="pt"))),
               ("pairs", dict(tokenizer([a for a, _ in PARITY_PAIRS], [b for _, b in PARITY_PAIRS], padding=True,
                                        return_tensors="pt")))]
    if dev is not None:
        from tinybert.task import length_batches

        rows = dev.select(range(min(DEV_PARITY_ROWS, len(dev))))
        batches += [("dev", batch) for _, batch in length_batches(rows, pad_token_id, 16)]
    return batches


@torch.no_grad()
def parity(sess, served: Served, bert, batches: list[tuple[str, dict]]) -> dict[str, float]:
    """Max abs difference of the graph's output against the transformers model it was traced from and against
    tinybert's own BERT (logits, or the last hidden state at real tokens), over all batches."""
    worst = {"transformers": 0.0, "tinybert": 0.0}
    for _, batch in batches:
        onnx_out = torch.from_numpy(run_session(sess, batch))
        ours = bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        references = {"transformers": served(*(batch[name] for name in INPUTS)),
                      "tinybert": ours.logits if ours.logits is not None else ours.hidden_states[-1]}
        keep = None if ours.logits is not None else batch["attention_mask"].bool()  # padded positions are noise
        for name, ref in references.items():
            diff = (onnx_out - ref).abs()
            worst[name] = max(worst[name], float((diff[keep] if keep is not None else diff).max()))
    return worst


def predict_session(sess, dataset, pad_token_id: int, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, C) of a tokenized dataset in row order, from an ONNX Runtime session."""
    from tinybert.task import length_batches

    out = None
    for indices, batch in length_batches(dataset, pad_token_id, batch_size):
        logits = torch.from_numpy(run_session(sess, batch))
        out = torch.empty(len(dataset), logits.shape[-1]) if out is None else out
        out[indices] = logits
    return out


def named_task(model_dir: Path, task: str | None) -> tuple[str | None, str]:
    """The task to score int8 on, and who named it: --task, else the run that exported the model (recipe.yaml),
    else the model card's results (README.md)."""
    if task:
        return task, "--task"
    from tinybert.publish import _run_of

    run = _run_of(model_dir)
    if run is not None:
        import yaml

        try:
            recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
        except yaml.YAMLError:
            recipe = {}
        if isinstance(recipe, dict) and recipe.get("task"):
            return str(recipe["task"]), f"{run / 'recipe.yaml'}"
    card = model_dir / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        try:
            results = ModelCard.load(card).data.eval_results or []
        except Exception:  # a hand-edited card without valid metadata names no task
            results = []
        for r in results:
            if r.dataset_config:
                return r.dataset_config, f"{card}"
    return None, ""


def load_dev(model_dir: Path, task: str | None, data_dir: str | None, tokenizer):
    """(TaskSpec, tokenized first dev split, note) for the int8 score; (None, None, why not) when no task is named or,
    for a task read from the run or card, its files are not here. A task named with --task must load."""
    from tinybert.data import TASKS, tokenize
    from tinybert.task import TaskSource

    name, source = named_task(model_dir, task)
    if name is None:
        return None, None, "no task named (--task, the run's recipe.yaml or the model card)"
    if source != "--task":
        if name.lower() not in TASKS:
            return None, None, f"task {name!r} from {source} is not a GLUE task; give --task and --data-dir"
        if data_dir is None:
            from tinybert.demo import glue_dir

            data_dir = glue_dir()
        if data_dir is None:
            return None, None, f"task {name} from {source}, but no GLUE files here (give --data-dir)"
    import datasets

    task, raw = TaskSource(task=name, data_dir=data_dir).load(("dev",))
    split = task.dev_splits[0]
    dev = tokenize(datasets.DatasetDict({split: raw[split]}), tokenizer, task.max_seq_length)[split]
    return task, dev, f"{task.name} {split} ({len(dev)} rows; task from {source})"


def score_int8(task, dev, fp32_sess, int8_sess, pad_token_id: int) -> dict:
    """The task's metrics for fp32 and int8 ONNX Runtime (fp32 equals PyTorch within the parity tolerance) on the
    dev split, and the share of rows whose prediction int8 keeps."""
    from tinybert.metrics import compute_metrics
    from tinybert.task import to_predictions

    labels = np.asarray(list(dev["labels"]))
    predictions = {name: to_predictions(predict_session(s, dev, pad_token_id), task)
                   for name, s in (("fp32", fp32_sess), ("int8", int8_sess))}
    scores = {name: compute_metrics(task, p, labels) for name, p in predictions.items()}
    same = (np.isclose(predictions["fp32"], predictions["int8"], atol=0.05) if task.is_regression
            else predictions["fp32"] == predictions["int8"])
    return {"task": task.name, "examples": len(dev), "metric": task.main_metric,
            "fp32": scores["fp32"][task.main_metric], "int8": scores["int8"][task.main_metric],
            "metrics": scores, "agreement": float(np.mean(same))}


def export_onnx(model_dir: str | os.PathLike, output: str | os.PathLike | None = None, *, quantize: str | None = None,
                opset: int = DEFAULT_OPSET, seq_len_hint: int = 128, task: str | None = None,
                data_dir: str | None = None, overwrite: bool = False, echo=print) -> dict:
    """Export, check, quantise and score in a temporary folder beside --output, then move the files in; any failure
    leaves --output (and always the model directory) as it was. Returns the record written to onnx_export.json.
    output: default MODEL_DIR/onnx, the export beside the model that its card and push pick up."""
    require_onnx()
    model_dir = Path(model_dir)
    output = Path(output) if output is not None else model_dir / SUBFOLDER
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize}: int8 is the one quantisation supported")
    check_opset(opset)
    bert = load_model(model_dir).eval()  # one clear line for a directory that is not a BERT model
    config = bert.config
    if not 2 <= seq_len_hint <= config.max_position_embeddings:
        raise ExportError(f"--seq-len-hint {seq_len_hint}: give a length from 2 to the model's "
                          f"{config.max_position_embeddings} positions")
    check_output(output, model_dir, overwrite)
    tokenizer = load_tokenizer(model_dir, vocab_size=config.vocab_size)
    if task and not config.num_labels:
        raise ExportError(f"--task {task}: {model_dir} has no task head to score; export it without --task")
    dev_task, dev, dev_note = None, None, "the model has no task head"
    if config.num_labels and (quantize or task):
        dev_task, dev, dev_note = load_dev(model_dir, task, data_dir, tokenizer)

    import onnx
    import onnxruntime

    served = load_served(model_dir, bool(config.num_labels))
    external = 4 * bert.num_parameters()["total"] > 1.8 * 2**30  # protobuf's 2 GB limit on one file
    example = dict(tokenizer([a for a, _ in PARITY_PAIRS][:2], [b for _, b in PARITY_PAIRS][:2],
                             padding="max_length", truncation=True, max_length=seq_len_hint, return_tensors="pt"))
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.tmp-") as tmp:
        tmp = Path(tmp)
        echo(f"exporting {model_dir} to ONNX (opset {opset}, torch.onnx.export dynamo) ...")
        trace(served, example, tmp / MODEL_FILE, opset, external)
        try:
            fp32 = session(tmp / MODEL_FILE)
        except Exception as e:
            raise ExportError(f"onnxruntime {onnxruntime.__version__} cannot load the opset {opset} graph "
                              f"({str(e).splitlines()[0][:200]}); try --opset {DEFAULT_OPSET}") from e
        batches = parity_batches(tokenizer, dev, tokenizer.pad_token_id)
        diffs = parity(fp32, served, bert, batches)
        what = f"{len(PARITY_SENTENCES)} sentences, {len(PARITY_PAIRS)} sentence pairs" + (
            f", {min(DEV_PARITY_ROWS, len(dev))} dev rows" if dev is not None else "")
        if max(diffs.values()) > PARITY_TOLERANCE:
            raise ExportError(f"parity check failed: ONNX Runtime fp32 differs from PyTorch by "
                              f"{max(diffs.values()):.2e} (> {PARITY_TOLERANCE:.0e}) on {what}; nothing was written")
        echo(f"parity: ONNX Runtime fp32 vs PyTorch max abs diff {max(diffs.values()):.2e} on {what} "
             f"(tolerance {PARITY_TOLERANCE:.0e})")
        output_name = served.output
        record = {
            "source": str(model_dir.resolve()), "format": "onnx", "opset": opset,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "inputs": list(INPUTS), "output": output_name,
            "dynamic_axes": {"batch": 0, "sequence": 1}, "seq_len_hint": seq_len_hint,
            "parameters": bert.num_parameters()["total"],
            "files": {"fp32": MODEL_FILE},
            "parity": {"max_abs_diff": max(diffs.values()), "against": diffs, "tolerance": PARITY_TOLERANCE,
                       "checked_on": what},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
        }
        if quantize:
            record["files"]["int8"] = INT8_FILE
            record["int8"] = _int8(tmp, fp32, batches, external, (dev_task, dev, dev_note), tokenizer.pad_token_id,
                                   echo)
        config_text = (model_dir / "config.json").read_text()
        (tmp / "config.json").write_text(config_text)
        tokenizer.save_pretrained(str(tmp))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _move_in(tmp, output, stale=() if quantize else (INT8_FILE,))
    sizes = ", ".join(f"{f} {(output / f).stat().st_size / 2**20:.1f} MB" for f in record["files"].values())
    echo(f"wrote {output}: {sizes}; serve it with onnxruntime.InferenceSession('{output / MODEL_FILE}') and "
         f"AutoTokenizer.from_pretrained('{output}')")
    return record


def _int8(tmp: Path, fp32, batches, external: bool, dev_set: tuple, pad_token_id: int, echo) -> dict:
    """Quantise tmp/model.onnx to int8 beside it; its drift from fp32 on the parity batches and, when a dev set is
    at hand (dev_set: task, tokenized dev split, note), its score against fp32's. Returns the record's "int8"."""
    dev_task, dev, dev_note = dev_set
    quantize_int8(tmp / MODEL_FILE, tmp / INT8_FILE, external)
    int8 = session(tmp / INT8_FILE)
    drift = max(float(np.abs(run_session(int8, b) - run_session(fp32, b)).max()) for _, b in batches)
    record = {"quantization": "onnxruntime.quantization.quantize_dynamic: int8 weights per channel (MatMul), "
                              "activations quantised at run time",
              "max_abs_diff_vs_fp32": drift, "eval": None, "eval_note": dev_note}
    if dev is None:
        echo(f"int8: written; accuracy not measured: {dev_note}")
        return record
    result = score_int8(dev_task, dev, fp32, int8, pad_token_id)
    record["eval"] = result
    echo(f"int8: {result['metric']} {result['int8']:.4f} vs fp32 {result['fp32']:.4f} on {dev_note}; "
         f"{result['agreement']:.1%} of predictions unchanged")
    return record


def _move_in(tmp: Path, output: Path, stale: tuple[str, ...]) -> None:
    """Files of the finished export into --output (created if missing; an --overwrite drops a stale int8 file)."""
    output.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    for name in stale:
        (output / name).unlink(missing_ok=True)
    for path in tmp.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            os.replace(path, output / path.name)
        else:
            shutil.rmtree(output / path.name, ignore_errors=True)
            shutil.move(path, output / path.name)


# ------------------------------------------------------------------------------------------------- model card


def onnx_facts(export_dir: str | os.PathLike, repo: str | None = None, folder: str | None = None) -> dict | None:
    """What a model card says about an ONNX export folder: the parity figure, the int8 score against fp32, the
    measured speed (bench.json from `tinybert bench DIR --engine onnxruntime` as a `rundir.Bench`, when there is
    one) and the lines of an ONNX Runtime usage snippet: with `repo`, for its copy in that Hub repo's onnx/
    subfolder, else for the folder at `folder` (default: its name). None when the folder holds no export record."""
    export_dir = Path(export_dir)
    path = export_dir / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e}); export again") from None
    int8 = record.get("int8") or {}
    speed = Bench.read(export_dir / BENCH) if (export_dir / BENCH).is_file() else None
    graph = INT8_FILE if int8 else MODEL_FILE
    if repo:
        where = ["from huggingface_hub import snapshot_download", "from transformers import AutoTokenizer", "",
                 f'folder = snapshot_download("{repo}", allow_patterns=["{SUBFOLDER}/*"]) + "/{SUBFOLDER}"',
                 "tokenizer = AutoTokenizer.from_pretrained(folder)",
                 f'session = ort.InferenceSession(f"{{folder}}/{graph}")']
    else:
        name = folder or export_dir.name
        where = ["from transformers import AutoTokenizer", "",
                 f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
                 f'session = ort.InferenceSession("{name}/{graph}")']
    usage = [
        "import numpy as np",
        "import onnxruntime as ort",
        *where,
        'inputs = tokenizer(["A small model that reads like a big one."], padding=True, return_tensors="np")',
        f"{record['output']} = session.run(None, {{k: v.astype(np.int64) for k, v in inputs.items()}})[0]",
    ]
    parity = record["parity"]
    return {"files": record.get("files", {}), "opset": record.get("opset"), "output": record.get("output"),
            "parity_max_abs_diff": parity["max_abs_diff"], "parity_tolerance": parity.get("tolerance"),
            "parity_checked_on": parity.get("checked_on"),
            "int8_eval": int8.get("eval"), "int8_eval_note": int8.get("eval_note"),
            "speed": speed, "usage": usage}
