"""Labelled tasks: the nine GLUE tasks (TSV files or the `nyu-mll/glue` hub dataset) and custom CSV/TSV/JSON files,
tokenisation with dynamic padding, length-grouped batches and GLUE submission files (raw-text corpora: corpus.py).

Follows the GLUE TSV layout written by GLUE's `download_glue_data.py` and TinyBERT's task-distillation sequence
lengths (Jiao et al., 2020: 64 for single-sentence tasks, 128 for sentence pairs).
"""

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch


class DataError(ValueError):
    """Data that cannot be used: an unknown task, a missing split file, or a malformed row (named by file and line)."""


@dataclass(frozen=True)
class TaskSpec:
    """One labelled task: where its text and labels live, how it is scored, how long its sequences are. GLUE TSV
    columns are header names, or 0-based positions in a file with no header (CoLA train/dev)."""

    name: str
    text_columns: tuple[str, ...]  # nyu-mll/glue (or custom file) column names -> text_a[, text_b]
    label_names: tuple[str, ...] | None  # class id i is label_names[i]; None: regression
    metrics: tuple[str, ...]  # keys of compute_metrics' result
    main_metric: str  # picks the best checkpoint
    max_seq_length: int  # paper: 64 single sentence, 128 pairs
    glue_dir: str | None = None  # folder name written by download_glue_data.py
    tsv_columns: tuple[str | int, ...] = ()  # train/dev: text columns, then the label column
    tsv_test_columns: tuple[str | int, ...] = ()  # test: text columns; () = those of train/dev
    tsv_width: int = 0  # columns per row of a headerless file (CoLA); 0 = as many as the header has
    string_labels: bool = False  # TSV and submission hold label names (rte, mnli, qnli), not ids
    dev_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits, *self.test_splits)


# Label names and their order are the ClassLabel names of the Hugging Face `nyu-mll/glue` dataset (source: its
# features, as listed in tensorflow/datasets docs/community_catalog/huggingface/glue.md), so class ids agree with
# teachers fine-tuned on the hub dataset. Metrics and main metrics follow the paper's Table 1 (MCC for CoLA, F1 for
# MRPC/QQP, Spearman for STS-B, accuracy for the rest).
TASKS = {task.name: task for task in [
    TaskSpec("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), "matthews_correlation",
             64, glue_dir="CoLA", tsv_columns=(3, 1), tsv_test_columns=("sentence",), tsv_width=4),
    TaskSpec("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy", 64, glue_dir="SST-2",
             tsv_columns=("sentence", "label")),
    TaskSpec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "f1", 128,
             glue_dir="MRPC", tsv_columns=("#1 String", "#2 String", "Quality")),
    TaskSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "f1", 128,
             glue_dir="QQP", tsv_columns=("question1", "question2", "is_duplicate")),
    TaskSpec("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), "spearmanr", 128, glue_dir="STS-B",
             tsv_columns=("sentence1", "sentence2", "score")),
    TaskSpec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
             128, glue_dir="MNLI", tsv_columns=("sentence1", "sentence2", "gold_label"), string_labels=True,
             dev_splits=("validation_matched", "validation_mismatched"),
             test_splits=("test_matched", "test_mismatched")),
    TaskSpec("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "accuracy", 128,
             glue_dir="QNLI", tsv_columns=("question", "sentence", "label"), string_labels=True),
    TaskSpec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "accuracy", 128,
             glue_dir="RTE", tsv_columns=("sentence1", "sentence2", "label"), string_labels=True),
    TaskSpec("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "accuracy", 128,
             glue_dir="WNLI", tsv_columns=("sentence1", "sentence2", "label")),
]}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (a model's weights, a train file), read in 16 MB blocks (hashlib.file_digest
    needs Python 3.11; we support 3.10)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def get_task(name: str) -> TaskSpec:
    """The GLUE task called `name` (e.g. 'sst2'), or a DataError listing the known ones."""
    task = TASKS.get(name.lower()) if isinstance(name, str) else None
    if task is None:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or give your own files)")
    return task


# -------------------------------------------------------------------------------------------------------------- loading


def load_task(name: str, data_dir: str | os.PathLike | None = None,
              splits: Sequence[str] | None = None) -> datasets.DatasetDict:
    """One GLUE task as a DatasetDict with columns text_a, [text_b,] label, idx.

    label: class id (ClassLabel, HF order) or float32 score (stsb); -1 on unlabeled test rows. idx: row number.
    data_dir: the folder holding SST-2/, MRPC/, ... (or the task folder itself); without it, the `nyu-mll/glue` hub
    dataset. splits: train, validation (mnli: validation_matched, validation_mismatched), test (mnli: test_matched,
    test_mismatched); all by default, where missing test files are skipped (every split asked for by name must exist).
    """
    task = get_task(name)
    unknown = [s for s in splits or () if s not in task.splits]
    if unknown:
        raise DataError(f"task {task.name} has no split(s) {unknown}; its splits are {list(task.splits)}")
    if data_dir is None:
        return _load_glue_hub(task, splits)

    if splits is None:
        folder = _glue_folder(task, Path(data_dir))
        splits = [s for s in task.splits if not s.startswith("test") or (folder / _split_file(s)).is_file()]
    return datasets.DatasetDict({split: _glue_split(glue_file(task, data_dir, split), task, split) for split in splits})


def _split_file(split: str) -> str:
    # train -> train.tsv, validation -> dev.tsv, validation_matched -> dev_matched.tsv, test_matched -> test_matched.tsv
    return split.replace("validation", "dev") + ".tsv"


def glue_file(task: TaskSpec, data_dir: str | os.PathLike, split: str) -> Path:
    """The TSV file of one split of a GLUE task: in data_dir/SST-2/ (as download_glue_data.py writes it) or in
    data_dir itself, when it is the task folder."""
    path = _glue_folder(task, Path(data_dir)) / _split_file(split)
    if not path.is_file():
        raise DataError(f"missing split file {path} (split {split!r} of task {task.name})")
    return path


def _glue_folder(task: TaskSpec, root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    if (root / task.glue_dir).is_dir():
        return root / task.glue_dir
    if any((root / _split_file(s)).is_file() for s in task.splits):
        return root  # pointed straight at the task folder
    raise DataError(
        f"{root} holds no {task.glue_dir}/ folder and no GLUE TSV files: give the folder that holds {task.glue_dir}/ "
        f"(as GLUE's download_glue_data.py writes it) or {task.glue_dir}/ itself"
    )


def _read_csv(path: Path, delimiter: str, quoting: int, names: list[str] | None = None,
              required: Sequence[str] = ()) -> tuple[datasets.Dataset, list[int]]:
    """A CSV/TSV file through datasets' csv loader (cached by datasets), every value the string the file holds, and
    the line of each record, for messages. Under the loader, pandas fills a short row with empty strings, takes the
    first column of a long first row for an index and skips blank lines, so a pass with the csv module first checks
    that each record has the header's width (errors name the file and the line). names: the columns of a headerless
    file (CoLA); required: columns its header must have (GLUE)."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # MRPC starts with a BOM
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = names or next(reader, None)
        missing = [c for c in required if header is None or c not in header]
        if missing:
            raise DataError(f"{path} line 1: header lacks column(s) {missing}; the header is {header}")
        if not header:
            raise DataError(f"{path} line 1: expected a header line")
        lines = []
        for row in filter(None, reader):  # blank lines are no records
            if len(row) != len(header):
                sep = "tab" if delimiter == "\t" else "comma"
                raise DataError(f"{path} line {reader.line_num}: expected {len(header)} {sep}-separated columns, "
                                f"got {len(row)}")
            lines.append(reader.line_num)  # a quoted field may span lines: a record is named by its last line
    features = datasets.Features({c: datasets.Value("string") for c in header})
    if not lines:  # the loader refuses a split with no rows
        return datasets.Dataset.from_dict({c: [] for c in header}, features=features), lines
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the file's table is an intermediate step: no progress bar of its own
    try:
        table = datasets.load_dataset(
            "csv", data_files={"rows": str(path)}, split="rows", delimiter=delimiter, quoting=quoting,
            header=None if names else "infer", column_names=names, keep_default_na=False, features=features,
        )
    except datasets.exceptions.DatasetGenerationError as e:
        raise DataError(f"{path}: {' '.join(str(e.__cause__ or e).split())}") from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if len(table) != len(lines):
        raise DataError(f"{path}: datasets' csv loader read {len(table)} rows where the file has {len(lines)} records")
    return table, lines


def _glue_split(path: Path, task: TaskSpec, split: str) -> datasets.Dataset:
    return _to_dataset(task, split, *read_glue_tsv(path, task, labelled=not split.startswith("test"))[1:])


def read_glue_tsv(path: Path, task: TaskSpec, labelled: bool) -> tuple[datasets.Dataset, list[list[str]], list]:
    """One GLUE TSV file, checked row by row (errors name the file and the line): the file's table, its text
    columns and its labels (-1 in test files). GLUE text holds bare quotes (MRPC, RTE, STS-B): no quoting."""
    spec = task.tsv_columns if labelled else (task.tsv_test_columns or task.tsv_columns[:-1])
    names = [str(i) for i in range(task.tsv_width)] if isinstance(spec[0], int) else None  # headerless (CoLA)
    table, lines = _read_csv(path, "\t", csv.QUOTE_NONE, names, required=() if names else spec)
    text_spec = spec[:-1] if labelled else spec  # the label is the last column of train/dev
    texts = [table[str(c)] for c in text_spec]  # verbatim, as nyu-mll/glue has it (SST-2 keeps its trailing space)
    for column, values in zip(text_spec, texts):
        for i, text in enumerate(values):
            if not text.strip():
                name = f"column {column + 1}" if isinstance(column, int) else f"column {column!r}"
                raise DataError(f"{path} line {lines[i]}: empty text in {name}")
    if not labelled:
        return table, texts, [-1.0 if task.is_regression else -1] * len(table)
    ids = {n: i for i, n in enumerate(task.label_names)} if task.string_labels else _class_ids(task)
    return table, texts, _labels(table[str(spec[-1])], lambda i: f"{path} line {lines[i]}", task, ids)


def _class_ids(task: TaskSpec) -> dict[str, int]:
    return {str(i): i for i in range(task.num_labels)}


def _labels(raw: list, where: Callable[[int], str], task: TaskSpec, ids: dict[str, int],
            known: str | None = None) -> list:
    """Raw labels -> class ids (ids: label as written -> id) or finite scores (regression); where(i) names row i."""
    for i, v in enumerate(raw):
        if task.is_regression and not _parses_as_number(v):
            raise DataError(f"{where(i)}: label {v!r} is not a finite number")
        if not task.is_regression and str(v) not in ids:
            raise DataError(f"{where(i)}: label {v!r} is not one of {known or ', '.join(ids)}")
    return [float(v) for v in raw] if task.is_regression else [ids[str(v)] for v in raw]


def _features(task: TaskSpec) -> datasets.Features:
    texts = {"text_a": datasets.Value("string"), **({"text_b": datasets.Value("string")} if task.is_pair else {})}
    # float32 as nyu-mll/glue stores STS-B scores; ClassLabel keeps the names with the ids and allows -1 (unlabeled).
    label = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    return datasets.Features({**texts, "label": label, "idx": datasets.Value("int64")})


def _yield_rows(columns: dict[str, list]) -> Iterator[dict]:
    names = list(columns)
    for values in zip(*columns.values()):
        yield dict(zip(names, values))


def _to_dataset(task: TaskSpec, split: str, texts: list[list[str]], labels: list) -> datasets.Dataset:
    """Checked columns -> text_a[, text_b], label, idx as an Arrow table in the datasets cache (HF_DATASETS_CACHE),
    memory-mapped. Not `Dataset.from_dict`: `map` never caches results of in-memory datasets, so `tokenize` would
    re-run on every start. datasets keys the table by a hash of the columns (and this module's generator), so the
    same data finds its table, and `tokenize`'s map its result, while any change to a file gets a fresh one."""
    columns = {"text_a": texts[0], **({"text_b": texts[1]} if len(texts) == 2 else {}), "label": labels,
               "idx": list(range(len(labels)))}
    # A dict value (not a list) in gen_kwargs: datasets would shard a list into one generator call per item.
    return datasets.Dataset.from_generator(_yield_rows, features=_features(task), gen_kwargs={"columns": columns},
                                           split=split)


def _load_glue_hub(task: TaskSpec, splits: Sequence[str] | None) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset("nyu-mll/glue", task.name)
    except Exception as e:  # no network, hub down, offline mode: all end the same way for the user
        raise DataError(f"could not load nyu-mll/glue/{task.name} from the Hugging Face hub ({type(e).__name__}: {e}); "
                        f"without network access, download GLUE (download_glue_data.py) and pass --data-dir "
                        f"(the folder holding {task.glue_dir}/)") from e
    rename, features = dict(zip(task.text_columns, ("text_a", "text_b"))), _features(task)
    out = {}
    for split in splits or [s for s in task.splits if s in loaded]:
        if split not in loaded:
            raise DataError(f"nyu-mll/glue/{task.name} has no split {split!r}; it has {list(loaded)}")
        out[split] = loaded[split].rename_columns(rename).select_columns(list(features)).cast(features)
    return datasets.DatasetDict(out)


def load_custom(files: Mapping[str, str | os.PathLike], text_columns: Sequence[str], label_column: str,
                regression: bool | None = None) -> tuple[datasets.DatasetDict, TaskSpec]:
    """Your own task from CSV, TSV, JSON (an array of objects, or one object per line) or JSONL files, by extension.

    files: split -> path; 'train' is required (it defines the label set). Returns the same columns as load_task
    and a TaskSpec named 'custom'. Labels: the sorted set of train labels (numerically when all are integers), stored
    as strings; a split without the label column is unlabeled (-1). regression=None infers it: numeric train labels
    with a fractional value mean regression; integer-valued scores need regression=True.
    """
    if "train" not in files:
        raise DataError(f"custom data needs a 'train' file (it defines the label set); got splits {list(files)}")
    if len(text_columns) not in (1, 2):
        raise DataError(f"text_columns must name 1 or 2 columns, got {list(text_columns)}")
    wanted = [*text_columns, label_column]
    raw = {split: read_text_and_labels(Path(path), wanted) for split, path in files.items()}

    _, train_labels, _ = raw["train"]
    if train_labels is None:
        raise DataError(f"{files['train']}: no label column {label_column!r}")
    if regression is None:
        regression = all(_parses_as_number(v) for v in train_labels) and any(float(v) % 1 for v in train_labels)
    label_names, metrics = None, ("pearson", "spearmanr")
    if not regression:
        names = {str(v) for v in train_labels}
        try:
            label_names = tuple(sorted(names, key=int))
        except ValueError:  # not all integers: sorted as text
            label_names = tuple(sorted(names))
        if len(label_names) < 2:
            raise DataError(f"{files['train']}: column {label_column!r} has one label only, {label_names}; need 2+")
        metrics = ("accuracy", "f1") if len(label_names) == 2 else ("accuracy",)  # F1 of class 1 needs 2 classes
    task = TaskSpec("custom", tuple(text_columns), label_names, metrics, "spearmanr" if regression else "accuracy",
                    max_seq_length=128 if len(text_columns) == 2 else 64)
    label_ids = {n: i for i, n in enumerate(label_names or ())}
    known = f"the train labels {', '.join(label_names or ())}"
    out = {}
    for split, (texts, labels, where) in raw.items():
        ids = [-1.0 if regression else -1] * len(texts[0]) if labels is None else (
            _labels(labels, where, task, label_ids, known))
        out[split] = _to_dataset(task, split, texts, ids)
    return datasets.DatasetDict(out), task


def load_split_file(path: str | os.PathLike, task: TaskSpec, split: str = "train",
                    label_column: str = "label") -> datasets.Dataset:
    """One labelled split of `task` from a file, e.g. an augmented train set; the same columns as load_task's.

    A .tsv for a GLUE task is read in the task's GLUE layout (as GLUE's train.tsv, and TinyBERT's
    data_augmentation.py writing train_aug.tsv, have it). Anything else is CSV/TSV/JSON/JSONL with the task's text
    columns (`task.text_columns`: sentence, or sentence1 and sentence2, ...) and `label_column`, which holds label
    names or (GLUE tasks) class ids, or scores for a regression task.
    """
    path = Path(path)
    if task.glue_dir and path.suffix.lower() == ".tsv":
        if not path.is_file():
            raise DataError(f"missing file {path}")
        return _to_dataset(task, split, *read_glue_tsv(path, task, labelled=True)[1:])
    texts, labels, where = read_text_and_labels(path, [*task.text_columns, label_column])
    if labels is None:
        raise DataError(f"{path}: no label column {label_column!r}; its rows need the task's labels")
    ids = {} if task.is_regression else {n: i for i, n in enumerate(task.label_names)}
    if task.glue_dir:  # GLUE files hold ids (sst2, cola, ...) or names (rte, mnli, qnli): accept both
        ids.update(_class_ids(task))
    return _to_dataset(task, split, texts, _labels(labels, where, task, ids))


def read_records(path: str | os.PathLike) -> tuple[list[str], list[dict], Callable[[int], str]]:
    """The records of a custom CSV/TSV/JSON/JSONL file as they are: the column names (in order of appearance), one
    dict per record, and where(i), 'FILE line N' (or 'FILE record N' in a JSON array) for messages. CSV/TSV go
    through datasets' csv loader, every value a string; JSON keeps its values' types."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):  # ordinary quoted CSV/TSV (unlike GLUE's)
        table, lines = _read_csv(path, "\t" if suffix == ".tsv" else ",", csv.QUOTE_MINIMAL)
        return table.column_names, table.to_list(), lambda i: f"{path} line {lines[i]}"
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv, .json or .jsonl")
    # datasets' json loader fails on JSON Lines with blank lines and widens mixed int/float columns: ours.
    located = _json_records(path)
    records = [r for _, r in located]
    return list(dict.fromkeys(k for r in records for k in r)), records, lambda i: located[i][0]


def read_text_and_labels(path: Path, wanted: list[str]) -> tuple[list[list[str]], list | None, Callable[[int], str]]:
    """Text columns (all required) and the label column (optional) of one custom file, every record checked.
    Returns the text columns, the labels (None without a label column) and where(i) for messages."""
    _, records, where = read_records(path)
    if not records:
        raise DataError(f"{path}: no rows")
    *text_names, label_name = wanted
    for i, record in enumerate(records):
        missing = [c for c in text_names if c not in record]
        if missing:
            raise DataError(f"{where(i)}: no column(s) {missing}; found {list(record)}")
        for name in text_names:
            text = record[name]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where(i)}: empty or non-text value in column {name!r}: {text!r}")
        label = record.get(label_name)
        if label_name in records[0] and (label is None or label == "" or isinstance(label, (list, dict))):
            raise DataError(f"{where(i)}: missing or empty label in column {label_name!r}")
    texts = [[r[c] for r in records] for c in text_names]
    return texts, ([r[label_name] for r in records] if label_name in records[0] else None), where


def _json_records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) per object of a JSON array ('FILE record N') or of JSON Lines ('FILE line N')."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):  # one JSON array of objects
        return [_json_object(f"{path} record {i + 1}", item) for i, item in enumerate(_loads(text, path))]
    lines = enumerate(text.split("\n"), start=1)  # JSON Lines (not splitlines: JSON strings may hold U+2028)
    return [_json_object(f"{path} line {n}", _loads(line, path, n)) for n, line in lines if line.strip()]


def _loads(text: str, path: Path, line: int = 1):
    """json.loads of text that starts at `line` of the file; a DataError names the line of a syntax error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {line + e.lineno - 1}: invalid JSON: {e.msg}") from e


def _json_object(where: str, item) -> tuple[str, dict]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return where, item


def _parses_as_number(value) -> bool:
    """A label that reads as a finite number: 0.8 or "0.8" (a CSV cell); not a bool."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# -------------------------------------------------------------------------------------- tokenisation, padding, batching


def tokenize(dataset_dict: datasets.DatasetDict, tokenizer, max_seq_length: int) -> datasets.DatasetDict:
    """text_a[, text_b], label -> input_ids, token_type_ids, attention_mask (unpadded, at most max_seq_length,
    pairs truncated longest-first), labels; idx is kept.

    `map` caches its result next to a file-backed dataset (all of load_task/load_custom's are): the cache key is the
    dataset fingerprint plus a hash of this function with its tokenizer and max_seq_length.
    """

    def encode(batch):
        pair = (batch["text_b"],) if "text_b" in batch else ()
        enc = tokenizer(
            batch["text_a"], *pair, truncation="longest_first", max_length=max_seq_length,
            return_token_type_ids=True, return_attention_mask=True,
        )
        return {**{k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}, "labels": batch["label"]}

    out = {}
    for split, ds in dataset_dict.items():
        drop = [c for c in ("text_a", "text_b", "label") if c in ds.column_names]
        out[split] = ds.map(encode, batched=True, remove_columns=drop, desc=f"tokenizing {split}")
    return datasets.DatasetDict(out)


def collate_labelled(features: Sequence[Mapping], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Rows of `tokenize` -> a batch padded to its longest row (dynamic padding).

    input_ids, token_type_ids, attention_mask: (B, T) long, T = longest row; padding is pad_token_id, 0 and 0.
    labels: (B,) long for classes, float for regression scores. Other keys (idx) are left out.
    """
    batch = {key: pad_rows([f[key] for f in features], pad) for key, pad in
             (("input_ids", pad_token_id), ("token_type_ids", 0), ("attention_mask", 0)) if key in features[0]}
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        regression = any(isinstance(v, float) or (torch.is_tensor(v) and v.is_floating_point()) for v in labels)
        batch["labels"] = torch.tensor([float(v) for v in labels] if regression else [int(v) for v in labels],
                                       dtype=torch.float if regression else torch.long)  # B
    return batch


def pad_rows(rows: Sequence[Sequence[int]], value: int = 0) -> torch.Tensor:
    """Rows of token ids (or type ids, mask bits) -> (B, T) long, T = longest row, the rest filled with value."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)  # B, T
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                           mega: int = 50) -> list[list[int]]:
    """Shuffled batches of similar-length rows, so dynamic padding pads little: each shuffled mega-batch of
    mega*batch_size rows sorted by length and cut into batches, the batches shuffled. Every index appears exactly once.
    Only `generator` draws random numbers: the same generator state gives the same batches (resume relies on it).
    """
    if batch_size < 1 or mega < 1:
        raise ValueError(f"batch_size and mega must be >= 1, got {batch_size} and {mega}")
    lengths = [int(n) for n in lengths]
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = mega * batch_size
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])  # stable: ties keep shuffled order
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# ------------------------------------------------------------------------------------------------ GLUE submission files


def write_submission(task: str | TaskSpec, predictions: Sequence, path: str | os.PathLike,
                     indices: Sequence[int] | None = None) -> Path:
    """Write one GLUE server prediction file: a header `index<TAB>prediction`, then one row per test example.

    predictions: class ids (or scores for stsb) in test-file order; indices: the rows' idx (default 0, 1, ...).
    Written as label names for rte/mnli/qnli (the server expects them), ids for the other classification tasks,
    scores with 3 decimals for stsb. Naming the file (SST-2.tsv, MNLI-m.tsv, ...) is the caller's business.
    """
    task = get_task(task) if isinstance(task, str) else task
    values = predictions.tolist() if hasattr(predictions, "tolist") else list(predictions)
    indices = list(range(len(values))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(values):
        raise ValueError(f"{len(values)} predictions but {len(indices)} indices")
    rows = []
    for i, p in zip(indices, values):
        if task.is_regression:
            rows.append(f"{i}\t{float(p):.3f}\n")
        elif int(p) != p or not 0 <= int(p) < task.num_labels:
            raise ValueError(
                f"prediction {p!r} for index {i} is not a class id of {task.name} (0..{task.num_labels - 1})"
            )
        else:
            rows.append(f"{i}\t{task.label_names[int(p)] if task.string_labels else int(p)}\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("index\tprediction\n" + "".join(rows), encoding="utf-8")
    return path
