"""Raw-text corpora for general distillation (TinyBERT section 3.2, stage one): text -> BERT pre-training inputs
`[CLS] A [SEP] B [SEP]` (Devlin et al. 2019, section 3.1), tokenised once; no MLM/NSP labels, the losses are layer-wise.

Pipeline, every step a `datasets` transform whose cache files land next to the documents' Arrow file:
  read_documents   files -> one row per file (`text`: paragraphs, each on one line, separated by blank lines)
  tokenise         one batched map over documents, the tokenizer called on their paragraphs -> one token stream per doc
  hold out         whole documents (or, with a single document, its tail paragraphs), chosen by seed
  pack             stream -> rows of at most max_seq_length tokens, A/B split at a seeded random point
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from tinybert.data import pad_rows


class CorpusError(ValueError):
    """A corpus path or its contents cannot be used; the message is one line that names the path."""


DOCUMENT_FEATURES = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")})
STREAM_FEATURES = datasets.Features({
    "source": datasets.Value("string"),
    "doc": datasets.Value("int32"),  # row index in read_documents' dataset
    "input_ids": datasets.List(datasets.Value("int32")),  # the whole document, no special tokens
    "paragraph_lengths": datasets.List(datasets.Value("int32")),  # tokens per paragraph, sums to len(input_ids)
})
ROW_FEATURES = datasets.Features({"doc": datasets.Value("int32"), "input_ids": datasets.List(datasets.Value("int32")),
                                  "token_type_ids": datasets.List(datasets.Value("int8"))})

# Documents per map batch: a book is ~10^5 tokens, so larger batches only cost memory.
_DOCS_PER_BATCH = 8
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")  # one or more blank (or whitespace-only) lines
# `owner/name` or `name`, optionally `:config`; anything with a text-file suffix is taken for a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")


# -------------------------------------------------------------------------------------------------------- documents


def read_documents(paths: list[str], *, cache_dir: str | None = None) -> datasets.Dataset:
    """One row per document: `text` (paragraphs separated by a blank line, the hard-wrapped lines of each paragraph
    joined by single spaces) and `source` (the file, or the hub id).

    Each path is a text file (one file = one document), a folder (its `**/*.txt`, sorted), or, when no such path
    exists and it looks like `owner/name[:config]`, a `datasets` hub id whose `train` split's `text` rows become
    documents. Files are read through `Dataset.from_generator`, whose cache key holds every file's path, size and
    mtime, so an unchanged corpus is read from the Arrow cache and keeps its fingerprint across runs."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise CorpusError("no corpus paths given")
    parts, files = [], []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.glob("**/*.txt") if p.is_file())
            if not found:
                raise CorpusError(f"corpus folder has no .txt files: {path}")
            files.extend(found)
        elif path.exists():
            raise CorpusError(f"corpus path is neither a file nor a folder: {path}")
        elif _HUB_ID.match(str(given)) and path.suffix.lower() not in (".txt", ".text"):
            parts += [_read_files(files, cache_dir)] if files else []  # the files before it come first
            parts.append(_read_hub(str(given), cache_dir))
            files = []
        else:
            raise CorpusError(f"corpus path does not exist: {path}")
    if files:
        parts.append(_read_files(files, cache_dir))
    documents = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    documents = documents.filter(_has_text, batched=True)
    if len(documents) == 0:
        raise CorpusError(f"corpus is empty (no non-blank text): {', '.join(str(p) for p in paths)}")
    return documents


def _read_files(files: list[Path], cache_dir: str | None) -> datasets.Dataset:
    files = list(dict.fromkeys(f.resolve() for f in files))  # named twice (itself, its folder): one document
    # Size and mtime are in the builder's hashed kwargs only to invalidate the cache when a file changes
    # (the same key `datasets` uses for local data files); the generator itself ignores them.
    keyed = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    try:
        return datasets.Dataset.from_generator(
            _generate_documents, features=DOCUMENT_FEATURES, gen_kwargs={"files": keyed}, cache_dir=cache_dir
        )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, CorpusError):  # raised in the generator; `datasets` wraps it
            raise e.__cause__ from None
        raise


def _generate_documents(files):
    for name, _size, _mtime in files:
        try:
            text = Path(name).read_text(encoding="utf-8-sig")  # a BOM is not text; CRLF becomes LF
        except UnicodeDecodeError as e:
            raise CorpusError(f"corpus file is not UTF-8 text (bad byte at offset {e.start}): {name}") from None
        except OSError as e:
            raise CorpusError(f"cannot read corpus file ({e.strerror}): {name}") from None
        # Blank files yield an empty row (filtered later): a generator that yields nothing fails in `datasets`.
        yield {"text": "\n\n".join(_paragraphs(text)), "source": name}


def _read_hub(hub_id: str, cache_dir: str | None) -> datasets.Dataset:
    name, _, config = hub_id.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split="train", cache_dir=cache_dir)
    except Exception as e:  # offline, unknown id, gated, no train split: all end the same way for the user
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise CorpusError(
            f"{hub_id!r} is not a local file or folder, and loading it as a Hugging Face dataset failed "
            f"({type(e).__name__}: {reason}); offline? pass local .txt files or folders instead"
        ) from e
    if "text" not in dataset.column_names:
        raise CorpusError(f"dataset {hub_id!r} has no 'text' column (it has {', '.join(dataset.column_names)})")
    return dataset.select_columns(["text"]).map(_add_source, batched=True, fn_kwargs={"source": hub_id},
                                                features=DOCUMENT_FEATURES)


def _add_source(batch, source):
    return {"text": batch["text"], "source": [source] * len(batch["text"])}


def _has_text(batch):
    return [bool(text and text.strip()) for text in batch["text"]]


def _paragraphs(text: str) -> list[str]:
    """Blank lines separate paragraphs; inside one, hard-wrapped lines (and runs of spaces) become single spaces."""
    paragraphs = (" ".join(block.split()) for block in _PARAGRAPH_BREAK.split(text))
    return [p for p in paragraphs if p]


# ---------------------------------------------------------------------------------------------------- packed corpus


def build_corpus(paths: list[str], tokenizer, *, max_seq_length: int = 128, heldout_fraction: float | int = 0.01,
                 seed: int = 0, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Read, tokenise (once, cached by `datasets`), hold out and pack a corpus.

    Returns splits `train` and `heldout`, rows in document order (the training loop shuffles): `doc` (the document's
    row in `read_documents`), `input_ids` `[CLS] A [SEP] B [SEP]` of length <= max_seq_length, every row of a document
    but its last exactly max_seq_length, and `token_type_ids` (0 for `[CLS] A [SEP]`, 1 for `B [SEP]`).

    heldout_fraction: a float in [0, 1) is a fraction of the documents, an int a number of them; any non-zero value
    holds out at least one document and leaves at least one for training. With a single document the same numbers
    count its paragraphs, taken from its tail (none when it has only one paragraph)."""
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length must be at least 5 ([CLS] A [SEP] B [SEP]), got {max_seq_length}")
    if max_seq_length > tokenizer.model_max_length:
        raise ValueError(f"max_seq_length {max_seq_length} exceeds the tokenizer's {tokenizer.model_max_length}")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no [CLS]/[SEP] tokens; BERT inputs need both")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    documents = read_documents(paths, cache_dir=cache_dir)
    # Paragraphs are tokenised separately (no token straddles a paragraph break) and concatenated per document,
    # so that packing, which needs a whole document, reads one row. Cached: the fingerprint hashes the documents'
    # fingerprint, this function and the tokenizer, all stable across runs.
    streams = documents.map(
        _tokenize_documents, batched=True, batch_size=_DOCS_PER_BATCH, writer_batch_size=_DOCS_PER_BATCH,
        with_indices=True, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["text"], features=STREAM_FEATURES,
        desc="Tokenising documents",
    )
    train, heldout = _hold_out(streams, heldout_fraction, seed)
    pack = {"max_seq_length": max_seq_length, "seed": seed, "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id}
    return datasets.DatasetDict({
        split: stream.map(_pack, batched=True, batch_size=_DOCS_PER_BATCH, fn_kwargs=pack,
                          remove_columns=stream.column_names, features=ROW_FEATURES, desc=f"Packing {split}")
        for split, stream in (("train", train), ("heldout", heldout))
    })


def _tokenize_documents(batch, indices, tokenizer):
    per_doc = [_paragraphs(text) for text in batch["text"]]
    paragraphs = [p for doc in per_doc for p in doc]
    # verbose=False: a long paragraph is not an error here, packing cuts it to max_seq_length.
    encoded = iter(tokenizer(paragraphs, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False, verbose=False)["input_ids"] if paragraphs else [])
    docs = [[next(encoded) for _ in doc] for doc in per_doc]  # per document, its paragraphs' token ids
    return {"source": batch["source"], "doc": indices, "input_ids": [[t for ids in doc for t in ids] for doc in docs],
            "paragraph_lengths": [[len(ids) for ids in doc] for doc in docs]}


def _hold_out(streams: datasets.Dataset, heldout_fraction, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split tokenised documents into (train, heldout): whole documents chosen by `seed`, or with a single
    document its tail paragraphs."""
    if len(streams) == 1:
        n_paragraphs = len(streams.select_columns(["paragraph_lengths"])[0]["paragraph_lengths"])
        k = _heldout_count(heldout_fraction, n_paragraphs, "paragraphs of the single document")
        cut = n_paragraphs - k
        train, heldout = ({"start": 0, "stop": cut}, {"start": cut, "stop": n_paragraphs})
        return tuple(streams.map(_keep_paragraphs, fn_kwargs=kw, features=STREAM_FEATURES) for kw in (train, heldout))
    k = _heldout_count(heldout_fraction, len(streams), "documents")
    order = np.random.default_rng(seed).permutation(len(streams))
    return streams.select(sorted(order[k:].tolist())), streams.select(sorted(order[:k].tolist()))


def _heldout_count(heldout_fraction, n: int, unit: str) -> int:
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)):
        raise ValueError(f"heldout_fraction must be a float in [0, 1) or an int, got {heldout_fraction!r}")
    if isinstance(heldout_fraction, int):
        if heldout_fraction < 0:
            raise ValueError(f"heldout_fraction must be >= 0, got {heldout_fraction}")
        if heldout_fraction and heldout_fraction >= n:
            raise CorpusError(f"cannot hold out {heldout_fraction} of {n} {unit}: at least one must stay for training")
        return heldout_fraction
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1) when a float, got {heldout_fraction}")
    if heldout_fraction == 0.0 or n < 2:
        return 0
    return min(max(1, round(heldout_fraction * n)), n - 1)


def _keep_paragraphs(row, start, stop):
    lengths = row["paragraph_lengths"]
    first = sum(lengths[:start])
    last = first + sum(lengths[start:stop])
    return {"input_ids": row["input_ids"][first:last], "paragraph_lengths": lengths[start:stop]}


def _pack(batch, max_seq_length, seed, cls_token_id, sep_token_id):
    """Cut each document's stream into pieces of max_seq_length - 3 tokens and split each piece at a random point
    into non-empty A and B. The generator is seeded by (seed, doc), so rows do not depend on batching."""
    rows = {"doc": [], "input_ids": [], "token_type_ids": []}
    for doc, ids in zip(batch["doc"], batch["input_ids"]):
        rng = np.random.default_rng([seed, doc])
        for piece in _pieces(ids, max_seq_length - 3):
            cut = int(rng.integers(1, len(piece)))  # len(A) in [1, len(piece) - 1]
            rows["doc"].append(doc)
            rows["input_ids"].append([cls_token_id, *piece[:cut], sep_token_id, *piece[cut:], sep_token_id])
            rows["token_type_ids"].append([0] * (cut + 2) + [1] * (len(piece) - cut + 1))
    return rows


def _pieces(ids: list[int], span: int) -> list[list[int]]:
    """Consecutive pieces of `span` tokens; a 1-token tail borrows the last token of the piece before it, so every
    piece has >= 2 tokens and no token is dropped (only a 1-token document yields nothing)."""
    starts = list(range(0, len(ids), span))
    if len(starts) > 1 and len(ids) - starts[-1] == 1:
        starts[-1] -= 1
    ends = starts[1:] + [len(ids)]
    return [ids[s:e] for s, e in zip(starts, ends) if e - s >= 2]


# ------------------------------------------------------------------------------------------- batches and statistics


def collate_packed(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad packed rows to the longest row of the batch. Returns int64 `input_ids`, `token_type_ids` and
    `attention_mask` (1 on tokens, 0 on padding), each (B, T)."""
    if not features:
        raise ValueError("collate_packed needs at least one row")
    ids, types = [f["input_ids"] for f in features], [f["token_type_ids"] for f in features]
    return {"input_ids": pad_rows(ids, pad_token_id), "token_type_ids": pad_rows(types),
            "attention_mask": pad_rows([[1] * len(row) for row in ids])}


def corpus_stats(dataset_dict: datasets.DatasetDict) -> dict[str, dict[str, int]]:
    """Per split: `rows`, `tokens` (special tokens included, no padding) and `documents`."""
    stats = {}
    for split, dataset in dataset_dict.items():
        table = dataset.with_format("arrow")[:]  # honours any select()/shuffle() indices
        tokens = pc.sum(pc.list_value_length(table["input_ids"])).as_py() if len(dataset) else 0
        documents = len(pc.unique(table["doc"])) if "doc" in dataset.column_names and len(dataset) else 0
        stats[split] = {"rows": len(dataset), "tokens": int(tokens or 0), "documents": documents}
    return stats
