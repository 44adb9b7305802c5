"""Tests for tinybert/data.py and tinybert/metrics: real GLUE files, malformed-file errors, custom files,
tokenisation and padding, length-grouped batches, metrics against scikit-learn/scipy, submission files."""

import os

# No network here: fail fast instead of waiting on the hub (set before datasets/evaluate read them on import).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_var, "1")

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tinybert.data import (
    TASKS,
    DataError,
    collate_labelled,
    get_task,
    length_grouped_batches,
    load_custom,
    load_task,
    tokenize,
    write_submission,
)
from tinybert.metrics import compute_metrics, main_metric

DATA = Path(os.environ.get("TINYBERT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
GLUE = DATA / "glue"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"shared GLUE data not found at {GLUE} (set TINYBERT_DATA)")


@pytest.fixture(autouse=True, scope="module")
def quiet_datasets():
    """No progress bars in the test output (conftest's _caches keeps the Arrow tables out of ~/.cache)."""
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)  # bert-base-uncased vocab, from the installed MiniLM package


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The task table


def test_tasks_table():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert TASKS["rte"].label_names == TASKS["qnli"].label_names == ("entailment", "not_entailment")
    assert TASKS["wnli"].label_names == ("not_entailment", "entailment")
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert TASKS["mnli"].dev_splits == ("validation_matched", "validation_mismatched")
    for task in TASKS.values():
        assert task.max_seq_length == (128 if task.is_pair else 64)
        assert task.main_metric in task.metrics


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError, match=r"unknown task 'sst3'.*sst2.*mnli"):
        load_task("sst3", GLUE)
    with pytest.raises(DataError, match="unknown task"):
        get_task("imdb")


# ---------------------------------------------------------------------------------------------------------------------
# Real GLUE files (counts from shared/data/README.md)

COUNTS = {
    "sst2": (67_349, 872, 1_821),
    "mrpc": (3_668, 408, 1_725),
    "rte": (2_490, 277, 3_000),
    "cola": (8_551, 1_043, 1_063),
    "stsb": (5_749, 1_500, 1_379),
}
LABELS = {  # (train, validation) class id -> count
    "sst2": ({1: 37_569, 0: 29_780}, {1: 444, 0: 428}),
    "mrpc": ({1: 2_474, 0: 1_194}, {1: 279, 0: 129}),
    "rte": ({0: 1_249, 1: 1_241}, {0: 146, 1: 131}),  # 0 = entailment (HF order)
    "cola": ({1: 6_023, 0: 2_528}, {1: 721, 0: 322}),
}


@pytest.fixture(scope="module")
def glue():
    return {name: load_task(name, GLUE) for name in COUNTS}


@needs_glue
@pytest.mark.parametrize("name", list(COUNTS))
def test_glue_row_and_label_counts(glue, name):
    d = glue[name]
    assert list(d) == ["train", "validation", "test"]
    assert tuple(len(d[s]) for s in d) == COUNTS[name]
    assert set(d["test"]["label"]) == {-1}
    assert d["train"]["idx"][:3] == [0, 1, 2]
    assert ("text_b" in d["train"].column_names) == TASKS[name].is_pair
    if name in LABELS:
        assert Counter(d["train"]["label"]) == LABELS[name][0]
        assert Counter(d["validation"]["label"]) == LABELS[name][1]
        assert d["train"].features["label"].names == list(TASKS[name].label_names)
    else:  # stsb: float scores
        scores = d["validation"]["label"]
        assert all(isinstance(s, float) and 0.0 <= s <= 5.0 for s in scores)


@needs_glue
def test_glue_file_quirks(glue):
    mrpc, sst2, cola, stsb, rte = glue["mrpc"], glue["sst2"], glue["cola"], glue["stsb"], glue["rte"]
    # MRPC: the BOM is gone, bare quotes survive (one even opens the field).
    first = mrpc["train"][0]
    assert first["text_a"] == (
        'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .'
    )
    assert first["label"] == 1 and not first["text_a"].startswith("\ufeff")
    opening_quote = '" The foodservice pie business does not fit our long-term growth strategy .'
    assert mrpc["validation"][0]["text_b"] == opening_quote
    # SST-2 keeps its trailing space, as nyu-mll/glue does.
    assert sst2["train"][0] == {"text_a": "hide new secretions from the parental units ", "label": 0, "idx": 0}
    assert sst2["test"][0]["text_a"] == "uneasy mishmash of styles and genres ."
    # CoLA: headerless train (sentence = 4th column, label = 2nd), test with a header.
    assert cola["train"][0]["text_a"] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola["validation"][len(cola["validation"]) - 1]["idx"] == 1042  # no newline at the end of dev.tsv
    assert cola["test"][0]["text_a"] == "Bill whistled past the house."
    # STS-B: the float score in the last column.
    row = stsb["train"][1]
    assert (row["text_a"], row["text_b"]) == ("A man is playing a large flute.", "A man is playing a flute.")
    assert row["label"] == pytest.approx(3.8)
    # RTE: string labels mapped in HF order.
    assert rte["train"][0]["label"] == TASKS["rte"].label_names.index("not_entailment") == 1


@needs_glue
def test_glue_task_folder_and_split_selection():
    d = load_task("rte", GLUE / "RTE", splits=["validation"])
    assert list(d) == ["validation"] and len(d["validation"]) == 277
    with pytest.raises(DataError, match=r"no split\(s\) \['dev'\].*'validation'"):
        load_task("rte", GLUE, splits=["dev"])


@needs_glue
def test_load_is_cached_and_tokenize_map_cache_hits(tokenizer):
    a = load_task("rte", GLUE, splits=["validation"])["validation"]
    b = load_task("rte", GLUE, splits=["validation"])["validation"]
    assert a._fingerprint == b._fingerprint and a.cache_files  # Arrow on disk, same content -> same fingerprint
    t1 = tokenize(datasets.DatasetDict(validation=a), tokenizer, 128)["validation"]
    t2 = tokenize(datasets.DatasetDict(validation=b), tokenizer, 128)["validation"]
    assert t1.cache_files and t1.cache_files == t2.cache_files


# ---------------------------------------------------------------------------------------------------------------------
# Missing and malformed files


def test_missing_split_file_is_named(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood film \t1\n")
    with pytest.raises(DataError, match=r"missing split file .*SST-2/dev\.tsv"):
        load_task("sst2", tmp_path)
    with pytest.raises(DataError, match=r"missing split file .*SST-2/test\.tsv"):
        load_task("sst2", tmp_path, splits=["train", "test"])
    assert len(load_task("sst2", tmp_path, splits=["train"])["train"]) == 1
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\nbad film \t0\n")
    assert list(load_task("sst2", tmp_path)) == ["train", "validation"]  # test files are optional by default
    with pytest.raises(DataError, match="no MRPC/ folder"):
        load_task("mrpc", tmp_path)


@pytest.mark.parametrize(
    "folder, text, line, message",
    [
        ("SST-2", "sentence\tlabel\nfine \t1\ntoo\tmany\tcolumns\n", 3, "expected 2 tab-separated columns, got 3"),
        ("SST-2", "sentence\tlabel\nfine \t1\nworse \t2\n", 3, "label '2' is not one of 0, 1"),
        ("SST-2", "sentence\tlabel\nfine \t1\n  \t0\n", 3, "empty text in column 'sentence'"),
        ("SST-2", "text\tlabel\nfine \t1\n", 1, r"header lacks column\(s\) \['sentence'\]"),
        ("RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentails\n", 2, "label 'entails' is not one of entail"),
        ("CoLA", "gj04\t1\t\tA sentence.\ngj04\t1\tA sentence missing a column.\n", 2, "expected 4 tab-separated"),
        ("STS-B", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t4.2\n1\ta\tb\tfive\n", 3, "label 'five' is not a"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, folder, text, line, message):
    path = write(tmp_path / folder / "train.tsv", text)
    name = {"SST-2": "sst2", "RTE": "rte", "CoLA": "cola", "STS-B": "stsb"}[folder]
    with pytest.raises(DataError, match=f"{path} line {line}: {message}"):
        load_task(name, tmp_path, splits=["train"])


def test_values_are_read_as_written_and_every_row_has_the_header_width(tmp_path):
    """datasets' csv loader (pandas underneath) would take NA/null for missing values, fill a short row with empty
    strings and take the first column of a long first row for an index: none of it reaches a task."""
    write(tmp_path / "SST-2" / "train.tsv", 'sentence\tlabel\nNA\t1\nnull \t0\n"quoted\t1\n\n007\t0\n')
    train = load_task("sst2", tmp_path, splits=["train"])["train"]
    assert train["text_a"] == ["NA", "null ", '"quoted', "007"] and train["label"] == [1, 0, 1, 0]
    long_first = write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ntoo\tmany\tcolumns\n")
    with pytest.raises(DataError, match=f"{long_first} line 2: expected 2 tab-separated columns, got 3"):
        load_task("sst2", tmp_path, splits=["validation"])
    short = write(tmp_path / "short.csv", 'q,y\n"a, b",x\n"two\nlines",y\nc\n')
    with pytest.raises(DataError, match=f"{short} line 5: expected 2 comma-separated columns, got 1"):
        load_custom({"train": short}, ["q"], "y")
    na = write(tmp_path / "na.csv", 'q,y\nNA,None\n"two\nlines",nan\n')
    d, task = load_custom({"train": na}, ["q"], "y")
    assert task.label_names == ("None", "nan") and d["train"]["text_a"] == ["NA", "two\nlines"]


MNLI_TEXT = "index\tpromptID\tpairID\tgenre\ts1_bp\ts2_bp\ts1_p\ts2_p\tsentence1\tsentence2"


@pytest.mark.parametrize(
    "name, files",
    [  # the header layouts of the GLUE files not in shared/data (download_glue_data.py), cut to two rows
        ("mnli", {
            "train.tsv": f"{MNLI_TEXT}\tlabel1\tgold_label\n0\t1\t1e\tgov\t.\t.\t.\t.\tA b.\tC d.\tneutral\tneutral\n",
            "dev_matched.tsv": f"{MNLI_TEXT}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
            + "0\t1\t1e\tgov\t.\t.\t.\t.\tA b.\tC d.\tneutral\tneutral\tneutral\tneutral\tneutral\tcontradiction\n",
            "dev_mismatched.tsv": f"{MNLI_TEXT}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
            + "0\t1\t1e\tgov\t.\t.\t.\t.\tA b.\tC d.\tneutral\tneutral\tneutral\tneutral\tneutral\tentailment\n",
            "test_matched.tsv": f"{MNLI_TEXT}\n0\t1\t1e\tgov\t.\t.\t.\t.\tA b.\tC d.\n",
        }),
        ("qqp", {
            "train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tA b?\tC d?\t1\n",
            "dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tA b?\tC d?\t0\n",
            "test.tsv": "id\tquestion1\tquestion2\n0\tA b?\tC d?\n",
        }),
        ("qnli", {
            "train.tsv": "index\tquestion\tsentence\tlabel\n0\tA b?\tC d.\tnot_entailment\n",
            "dev.tsv": "index\tquestion\tsentence\tlabel\n0\tA b?\tC d.\tentailment\n",
            "test.tsv": "index\tquestion\tsentence\n0\tA b?\tC d.\n",
        }),
        ("wnli", {
            "train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA b.\tC d.\t1\n",
            "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA b.\tC d.\t0\n",
            "test.tsv": "index\tsentence1\tsentence2\n0\tA b.\tC d.\n",
        }),
    ],
)
def test_glue_layouts_of_the_large_tasks(tmp_path, name, files):
    task = TASKS[name]
    for file, text in files.items():
        write(tmp_path / task.glue_dir / file, text)
    d = load_task(name, tmp_path)
    assert list(d) == [s for s in task.splits if s != "test_mismatched"]  # absent test file skipped
    first = {split: d[split][0] for split in d}
    assert all((row["text_a"][0], row["text_b"][0]) == ("A", "C") for row in first.values())
    labels = [first[s]["label"] for s in d]
    expected = {"mnli": [1, 2, 0, -1], "qqp": [1, 0, -1], "qnli": [1, 0, -1], "wnli": [1, 0, -1]}[name]
    assert labels == expected


def test_hub_path_gives_the_same_columns(monkeypatch):
    hub = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"premise": ["A b."], "hypothesis": ["C d."], "label": [2], "idx": [0]},
            features=datasets.Features({
                "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                "idx": datasets.Value("int32"),
            }),
        )
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name: hub if name == "mnli" else 0)
    d = load_task("mnli", splits=["train"])
    assert d["train"][0] == {"text_a": "A b.", "text_b": "C d.", "label": 2, "idx": 0}
    assert d["train"].features["idx"].dtype == "int64"  # cast to the TSV path's features
    assert d["train"].features["label"].names == list(TASKS["mnli"].label_names)
    with pytest.raises(DataError, match="has no split 'validation_matched'"):
        load_task("mnli", splits=["validation_matched"])


def test_hub_failure_suggests_data_dir(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"nyu-mll/glue/sst2.*--data-dir"):
        load_task("sst2")


# ---------------------------------------------------------------------------------------------------------------------
# Custom files


def test_custom_csv_pair_classification(tmp_path):
    train = write(tmp_path / "train.csv", 'q,a,y\n"Is it, really?",yes,pos\nwhy,"because\nreasons",neg\nhow,so,neu\n')
    dev = write(tmp_path / "dev.csv", "q,a,y\nwho,me,neg\n")
    test = write(tmp_path / "test.csv", "q,a\nwhere,here\n")
    d, task = load_custom({"train": train, "validation": dev, "test": test}, ["q", "a"], "y")
    assert task.label_names == ("neg", "neu", "pos") and task.is_pair and task.max_seq_length == 128
    assert task.metrics == ("accuracy",) and task.main_metric == "accuracy"
    assert d["train"]["label"] == [2, 0, 1] and d["validation"]["label"] == [0] and d["test"]["label"] == [-1]
    assert d["train"][1]["text_b"] == "because\nreasons"
    assert d["train"][0]["text_a"] == "Is it, really?"

    bad = write(tmp_path / "bad.csv", "q,a,y\nwho,me,neg\nwhat,you,maybe\n")
    with pytest.raises(DataError, match=f"{bad} line 3: label 'maybe' is not one of the train labels neg, neu, pos"):
        load_custom({"train": train, "validation": bad}, ["q", "a"], "y")
    with pytest.raises(DataError, match=r"line 2: no column\(s\) \['question'\]"):
        load_custom({"train": train}, ["question", "a"], "y")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_custom({"train": write(tmp_path / "train.txt", "x")}, ["q"], "y")


def test_custom_tsv_integer_labels_sort_numerically(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tstars\nok\t10\nbad\t2\nfine\t9\n")
    d, task = load_custom({"train": train}, ["text"], "stars")
    assert task.label_names == ("2", "9", "10") and not task.is_pair and task.max_seq_length == 64
    assert d["train"]["label"] == [2, 0, 1]


def test_custom_jsonl_and_json_regression(tmp_path):
    rows = [{"s": "a cat", "t": "a dog", "score": 1.5}, {"s": "a man", "t": "a man", "score": 5}]
    train = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dev = write(tmp_path / "dev.json", json.dumps([{"s": "x y", "t": "x", "score": 3.25}]))
    d, task = load_custom({"train": train, "validation": dev}, ["s", "t"], "score")
    assert task.is_regression and task.metrics == ("pearson", "spearmanr")
    assert d["train"]["label"] == [1.5, 5.0] and d["validation"]["label"] == [3.25]
    assert d["train"].features["label"].dtype == "float32"

    ints = write(tmp_path / "ints.jsonl", '{"s": "a", "t": "b", "score": 1}\n{"s": "c", "t": "d", "score": 0}\n')
    _, as_classes = load_custom({"train": ints}, ["s", "t"], "score")
    assert as_classes.label_names == ("0", "1") and as_classes.metrics == ("accuracy", "f1")
    _, as_scores = load_custom({"train": ints}, ["s", "t"], "score", regression=True)
    assert as_scores.is_regression

    broken = write(tmp_path / "bad.jsonl", '{"s": "a", "t": "b", "score": 1.5}\n\n{"s": "a", "t": "b", "score": "x"}\n')
    with pytest.raises(DataError, match=f"{broken} line 3: label 'x' is not a finite number"):
        load_custom({"train": train, "validation": broken}, ["s", "t"], "score")
    with pytest.raises(DataError, match="line 1: empty or non-text value in column 's'"):
        load_custom({"train": write(tmp_path / "e.jsonl", '{"s": "", "t": "b", "score": 1.5}\n')}, ["s", "t"], "score")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenisation, padding, batching


def toy_task(pair: bool, regression: bool = False):
    rows = {
        "text_a": ["a short one", "a much longer sentence with quite a few more words in it", "mid length text"],
        "label": [0.5, 2.0, 4.25] if regression else [0, 1, 1],
        "idx": [0, 1, 2],
    }
    if pair:
        rows["text_b"] = ["and its partner sentence", "short", "another fairly long partner sentence here"]
    return datasets.DatasetDict(train=datasets.Dataset.from_dict(rows))


def test_tokenize_truncates_without_padding(tokenizer):
    out = tokenize(toy_task(pair=True), tokenizer, max_seq_length=12)["train"]
    assert set(out.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels", "idx"}
    lengths = [len(ids) for ids in out["input_ids"]]
    assert max(lengths) == 12 and min(lengths) < 12  # truncated, not padded
    for ids, types, mask in zip(out["input_ids"], out["token_type_ids"], out["attention_mask"]):
        assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2
        assert 1 in types and len(types) == len(mask) == len(ids) and all(mask)
    # longest-first: the long first sentence is cut, the short second one ("short") survives whole
    second = out[1]
    assert tokenizer.decode([t for t, s in zip(second["input_ids"], second["token_type_ids"]) if s][:-1]) == "short"


def test_collate_dynamic_padding(tokenizer):
    rows = list(tokenize(toy_task(pair=False), tokenizer, 64)["train"])
    lengths = [len(r["input_ids"]) for r in rows]
    batch = collate_labelled(rows, pad_token_id=tokenizer.pad_token_id)
    B, T = len(rows), max(lengths)
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape == (B, T)
    assert T < 64  # padded to the longest row, not to max_seq_length
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][0, lengths[0]:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 1]
    assert "idx" not in batch

    scores = collate_labelled(list(tokenize(toy_task(pair=True, regression=True), tokenizer, 64)["train"]))
    assert scores["labels"].dtype == torch.float32 and scores["labels"].tolist() == [0.5, 2.0, 4.25]


def test_length_grouped_batches():
    lengths = torch.randint(5, 120, (1003,), generator=torch.Generator().manual_seed(1)).tolist()

    def batches(seed):
        return length_grouped_batches(lengths, 16, torch.Generator().manual_seed(seed), mega=10)

    a = batches(0)
    assert sorted(i for b in a for i in b) == list(range(1003))  # every index exactly once
    assert all(1 <= len(b) <= 16 for b in a)
    assert a == batches(0) and a != batches(1)  # deterministic for a generator state
    # grouping pays: far fewer padded positions than the same batch sizes drawn at random
    padded = sum(len(b) * max(lengths[i] for i in b) for b in a)
    order = torch.randperm(1003, generator=torch.Generator().manual_seed(0)).tolist()
    random = sum(16 * max(lengths[i] for i in order[k : k + 16]) for k in range(0, 1003, 16))
    assert padded < 0.8 * random
    # the generator state carries over: a second epoch differs, and replays from a saved state
    g = torch.Generator().manual_seed(3)
    length_grouped_batches(lengths, 16, g)
    state = g.get_state()
    epoch2 = length_grouped_batches(lengths, 16, g)
    assert epoch2 == length_grouped_batches(lengths, 16, torch.Generator().set_state(state))


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("name", list(TASKS))
def test_metrics_match_sklearn_and_scipy(name):
    rng = np.random.default_rng(0)
    task = TASKS[name]
    if task.is_regression:
        refs, preds = rng.uniform(0, 5, 200), rng.uniform(0, 5, 200)
        expected = {"pearson": pearsonr(preds, refs)[0], "spearmanr": spearmanr(preds, refs)[0]}
    else:
        refs, preds = rng.integers(0, task.num_labels, 200), rng.integers(0, task.num_labels, 200)
        expected = {"accuracy": accuracy_score(refs, preds)}
        if name in ("mrpc", "qqp"):
            expected["f1"] = f1_score(refs, preds)
        if name == "cola":
            expected = {"matthews_correlation": matthews_corrcoef(refs, preds)}
    got = compute_metrics(name, preds, refs)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12)
    assert main_metric(name) == task.main_metric


def test_metrics_for_a_custom_task(tmp_path):
    train = write(tmp_path / "train.csv", "t,y\na,x\nb,y\n")
    _, task = load_custom({"train": train}, ["t"], "y")
    got = compute_metrics(task, [0, 1, 1, 0], [0, 1, 0, 0])
    assert got == pytest.approx({"accuracy": 0.75, "f1": f1_score([0, 1, 0, 0], [0, 1, 1, 0])})


# ---------------------------------------------------------------------------------------------------------------------
# Submission files


def test_write_submission_formats(tmp_path):
    path = write_submission("rte", [0, 1, 1], tmp_path / "RTE.tsv")
    assert path.read_text() == "index\tprediction\n0\tentailment\n1\tnot_entailment\n2\tnot_entailment\n"
    path = write_submission("sst2", np.array([1, 0]), tmp_path / "SST-2.tsv")
    assert path.read_text() == "index\tprediction\n0\t1\n1\t0\n"
    path = write_submission("stsb", torch.tensor([4.2, 0.0]), tmp_path / "STS-B.tsv", indices=[7, 8])
    assert path.read_text() == "index\tprediction\n7\t4.200\n8\t0.000\n"
    path = write_submission("mnli", [2, 1], tmp_path / "sub" / "MNLI-m.tsv")
    assert path.read_text().splitlines()[1:] == ["0\tcontradiction", "1\tneutral"]
    with pytest.raises(ValueError, match="not a class id of sst2"):
        write_submission("sst2", [2], tmp_path / "x.tsv")


@needs_glue
def test_submission_for_a_real_test_file(glue, tmp_path):
    test = glue["rte"]["test"]
    path = write_submission("rte", [i % 2 for i in range(len(test))], tmp_path / "RTE.tsv", indices=test["idx"])
    lines = path.read_text().splitlines()
    assert len(lines) == 3_001 and lines[0] == "index\tprediction" and lines[-1] == "2999\tnot_entailment"
