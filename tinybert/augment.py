"""TinyBERT's task data augmentation (Jiao et al., 2020, section 3.1 and Algorithm 1), batched, seeded and resumable.

Every eligible word (alphabetic, not a stop word) of a training sentence gets up to K candidates: a word that is one
piece of the masked LM's vocabulary is masked and the MLM's top K whole words there are its candidates; a word of
several pieces takes its K nearest neighbours in a word-vector file (GloVe text format) when one is given. Then N
times, each word is replaced by a random candidate with probability p; variants equal to the original or to an
earlier variant are dropped, the original row is kept, labels and every other column are copied.

Where this departs from the original `data_augmentation.py` (huawei-noah/Pretrained-Language-Model, TinyBERT/):
- All masked positions of a shard of sentences run in a few batched forwards (lengths grouped) under
  `inference_mode`, and only the masked positions go through the MLM head; the original runs one forward per word at
  batch size 1 with autograd on.
- Candidates are whole words of the MLM's vocabulary (a token that the tokenizer gives back, alone, for its own
  text) that pass the same test as the words replaced (letters only); the original keeps punctuation, [UNK] and the
  like from its top K and drops `##` pieces after taking it, so it has fewer than K.
- Without word vectors a multi-piece word is masked whole (its pieces become one [MASK]) and the MLM's top K single
  words fill it; the original leaves such words unchanged when no vectors file is given (it cannot run without one).
- A variant is the original text with the chosen words replaced in place (spacing, case and punctuation kept; a
  capitalised word gets a capitalised candidate); the original joins its basic tokenizer's lower-cased tokens.
- Pair tasks: each field is augmented from the original row, the other field kept as it was; the original carries
  the last variant of the first field into the rows that augment the second (it edits the row in place).
- Randomness is per row and field (seeded by --seed, the row number and the field), so the output does not depend
  on shard size, process count or where a killed run stopped.
Kept from the original: K = 15, p = 0.4, N = 20 (10 for MNLI and QQP), its stop-word list, and the MLM's input
`[CLS] masked sentence [SEP] original sentence [SEP]` (`mlm_input="pair"`; "masked" leaves the original out).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers.pre_tokenizers import BertPreTokenizer

from tinybert.data import (DataError, TaskSpec, file_sha256, get_task, glue_file, load_task, pad_rows, read_glue_tsv,
                           read_records, read_text_and_labels)
from tinybert.train import autocast, barrier, decide_precision, default_device

# Bump when the same inputs and settings would give other output, so partial shards of older code are not reused.
_FORMAT = "tinybert-augment-1"
SHARD_ROWS = 256  # rows per shard: the unit of resume and of multi-process work

# The original's list (NLTK's English stop words, plus 's and 're).
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his himself
she she's her hers herself it it's its itself they them their theirs themselves this that that'll these those am is
are was were be been being have has had having do does did doing a an the and but if or because as until while of at
by for with about against between into through during before after above below to from up down in out on off over
under again further then once here there all any both each few more most other some such no nor not only own same so
than too very s t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn
didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't
shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't 's 're
""".split())

# Copies per source sentence: the paper's N = 20, and the original's 10 for its two largest tasks.
DEFAULT_COPIES = {"mnli": 10, "qqp": 10}

_WORD = re.compile(r"[a-z]+")


class AugmentError(ValueError):
    """Settings, models or files that augmentation cannot use; one line says what and how to fix it."""


def is_word(text: str) -> bool:
    """Letters a-z only (any case): the words the original replaces, and the candidates we allow."""
    return bool(_WORD.fullmatch(text.lower()))


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    copies: int = 20  # N: variants tried per sentence (duplicates dropped)
    mask_prob: float = 0.4  # p: probability that a word is replaced in a variant
    candidates: int = 15  # K: candidates per word
    candidates_from: Literal["both", "mlm", "vectors"] = "both"  # both: MLM for one-piece words, vectors for others
    mlm_input: Literal["pair", "masked"] = "pair"  # pair: [CLS] masked [SEP] original [SEP], as the original
    seed: int = 42
    vectors_limit: int = 100_000  # the word-vector file's first N lines (the original reads 100,000)
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self):
        checks = [
            (self.copies >= 1, "--copies must be >= 1"),
            (0.0 < self.mask_prob <= 1.0, "--mask-prob must be in (0, 1]"),
            (self.candidates >= 1, "--candidates must be >= 1"),
            (self.candidates_from in ("both", "mlm", "vectors"), "--candidates-from is mlm, vectors or both"),
            (self.mlm_input in ("pair", "masked"), "--mlm-input is pair or masked"),
            (self.vectors_limit >= 1, "the word-vector limit must be >= 1"),
            (self.precision in ("auto", "fp32", "bf16"), "--precision is auto, fp32 or bf16"),
        ]
        for ok, message in checks:
            if not ok:
                raise AugmentError(f"{message}; got {dataclasses.asdict(self)}")


# ------------------------------------------------------------------------------------------- candidate sources


class MaskedLM:
    """A masked LM that `AutoModelForMaskedLM` loads (a directory or a hub id), with its own tokenizer, proposing
    whole-word candidates for masked positions in batched forwards."""

    batch_tokens = 16384  # tokens per batched forward (rows x padded length)

    def __init__(self, source: str, device: torch.device, precision: str = "fp32", *, pair: bool = True):
        import transformers
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the missing-head warning becomes our own error below
        transformers.logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            model, info = AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True)
        except (OSError, ValueError, KeyError) as e:
            raise AugmentError(f"could not load the masked LM {source!r}: {str(e).splitlines()[0]} (give a model "
                               f"directory or hub id that AutoModelForMaskedLM loads, e.g. bert-base-uncased)") from e
        finally:
            transformers.logging.set_verbosity(verbosity)
            transformers.logging.enable_progress_bar()
        prefix = model.base_model_prefix + "."
        head_missing = sorted(k for k in info["missing_keys"] if not k.startswith(prefix))
        if head_missing:
            raise AugmentError(
                f"{source} has no masked-LM head (missing {', '.join(head_missing[:3])}...): it is an encoder "
                f"without one, e.g. a sentence-embedding model; pass a masked LM such as bert-base-uncased to --mlm, "
                f"or draw every candidate from word vectors (--candidates-from vectors --word-vectors FILE)")
        if not self.tokenizer.is_fast or self.tokenizer.mask_token_id is None:
            raise AugmentError(f"{source}: augmentation needs a fast tokenizer with a mask token")
        self.device, self.precision = device, precision
        self.pair = pair  # the MLM reads [CLS] masked [SEP] original [SEP] (the original's input), else [CLS] masked
        self.model = model.to(device).eval()
        self.max_length = min(self.tokenizer.model_max_length, model.config.max_position_embeddings)
        self.pre_tokenizer = self.tokenizer.backend_tokenizer.pre_tokenizer
        # Only the masked rows need the head: run the encoder, gather, then the head. Models whose head is not one
        # child module beside the encoder (DistilBERT) run whole.
        heads = [m for _, m in model.named_children() if m is not model.base_model]
        self.head = heads[0] if len(heads) == 1 else None
        self.words, self.allowed = self._vocabulary()

    def _vocabulary(self) -> tuple[list[str], torch.Tensor]:
        """Per token id: its text, and whether it may be a candidate (a whole word of letters that the tokenizer
        gives back, alone, for that text; no specials, no word pieces)."""
        tok = self.tokenizer
        texts = [tok.convert_tokens_to_string([t]).strip() for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
        special = set(tok.all_special_ids)
        ids = [i for i, t in enumerate(texts) if i not in special and is_word(t)]
        encoded = tok([texts[i] for i in ids], add_special_tokens=False)["input_ids"]
        allowed = torch.zeros(len(tok), dtype=torch.bool)
        allowed[torch.tensor([i for i, pieces in zip(ids, encoded) if pieces == [i]], dtype=torch.long)] = True
        return texts, allowed

    def digest(self) -> str:
        """Content hash of the weights and the vocabulary: the MLM's part of a run's fingerprint."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        h.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
        return h.hexdigest()

    def queries(self, words: list[list[str]], slots: list[list[int]], whole_word: bool) -> list[tuple]:
        """Masked inputs for every slot: (text index, slot index, input_ids, token_type_ids, mask position).

        words: per text, its words; slots: per text, the word indices that want MLM candidates. A word of one piece
        is masked as it is; with whole_word a word of several pieces becomes one [MASK]; other words get none.
        """
        tok, out = self.tokenizer, []
        pair = (words,) if self.pair else ()
        enc = tok(words, *pair, is_split_into_words=True, truncation="longest_first", max_length=self.max_length,
                  return_token_type_ids=True)
        for t, wanted in enumerate(slots):
            ids, types = enc["input_ids"][t], enc["token_type_ids"][t]
            for k, w in enumerate(wanted):
                at = enc.word_to_tokens(t, w, sequence_index=0)  # the word's pieces in the masked sentence
                if at is None or (at.end - at.start > 1 and not whole_word):
                    continue  # cut by truncation, or a multi-piece word for the vectors
                q_ids = [*ids[: at.start], tok.mask_token_id, *ids[at.end :]]  # its pieces become one [MASK]
                out.append((t, k, q_ids, [*types[: at.start + 1], *types[at.end :]], at.start))
        return out

    @torch.inference_mode()
    def fill(self, queries: list[tuple], k: int) -> list[list[str]]:
        """Top-k allowed words at each query's mask, batched by length (longest first, at most batch_tokens)."""
        order = sorted(range(len(queries)), key=lambda i: -len(queries[i][2]))
        results: list[list[str]] = [[] for _ in queries]
        allowed = self.allowed.to(self.device)
        start = 0
        while start < len(order):
            chunk = order[start : start + max(1, self.batch_tokens // len(queries[order[start]][2]))]
            start += len(chunk)
            _, _, ids, types, at = zip(*(queries[i] for i in chunk))
            mask = pad_rows([[1] * len(row) for row in ids])  # B, T
            ids, types, at = pad_rows(ids, self.tokenizer.pad_token_id or 0), pad_rows(types), torch.tensor(at)
            logits = self._logits(ids.to(self.device), types.to(self.device), mask.to(self.device), at)  # B, V
            logits = logits.float().masked_fill(~allowed[: logits.shape[-1]], float("-inf"))
            top = logits.topk(min(k, int(allowed.sum())), dim=-1).indices.tolist()
            for row, i in enumerate(chunk):
                results[i] = [self.words[j] for j in top[row]]
        return results

    def _logits(self, ids, types, mask, at) -> torch.Tensor:
        rows = torch.arange(ids.shape[0])
        with autocast(self.device, self.precision):
            inputs = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.tokenizer.model_input_names:
                inputs["token_type_ids"] = types
            if self.head is None:
                return self.model(**inputs).logits[rows, at]
            hidden = self.model.base_model(**inputs).last_hidden_state  # B, T, H
            return self.head(hidden[rows, at])  # B, V


class WordVectors:
    """Word vectors in GloVe's text format (`word v1 v2 ...` per line), unit-normalised, for nearest neighbours.

    Only the first `limit` lines are read (the original reads 100,000); words that are not letters only are left
    out as candidates."""

    def __init__(self, words: list[str], vectors: np.ndarray):
        self.words, self.index = words, {w: i for i, w in enumerate(words)}
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = torch.from_numpy(vectors / np.where(norms > 0, norms, 1.0)).float()  # V, d

    @classmethod
    def load(cls, path: str | os.PathLike, limit: int = 100_000) -> WordVectors:
        path = Path(path)
        if not path.is_file():
            raise AugmentError(f"word-vectors file {path} does not exist (give a GloVe text file, e.g. "
                               f"glove.6B.300d.txt)")
        words, rows, dim = [], [], None
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(itertools.islice(f, limit), start=1):
                parts = line.rstrip("\n").rstrip().split(" ")
                try:
                    values = np.asarray(parts[1:], dtype=np.float32)
                except ValueError:
                    values = None
                dim = dim or (len(parts) - 1 if values is not None else None)
                if values is None or not dim or len(values) != dim or not np.isfinite(values).all():
                    raise AugmentError(f"{path} line {n}: expected a word and {dim or 'its'} numbers separated by "
                                       f"spaces (GloVe text format), got {line[:60].rstrip()!r}")
                if is_word(parts[0]):
                    words.append(parts[0])
                    rows.append(values)
        if not words:
            raise AugmentError(f"{path}: no word vectors (an empty file, or no words of letters in its first "
                               f"{limit} lines)")
        return cls(words, np.stack(rows))

    def digest(self) -> str:
        h = hashlib.sha256("\n".join(self.words).encode())
        h.update(self.vectors.numpy().tobytes())
        return h.hexdigest()

    def neighbours(self, words: list[str], k: int) -> list[list[str]]:
        """The k nearest other words by cosine similarity, per word (lower-cased look-up; [] when unknown).

        Each distinct word is looked up once per call; callers keep the calls' contents fixed (a shard's words),
        so float rounding in the batched product cannot make a resumed run differ."""
        unique = sorted({w.lower() for w in words if w.lower() in self.index})
        found: dict[str, list[str]] = {}
        for start in range(0, len(unique), 1024):
            part = unique[start : start + 1024]
            rows = torch.tensor([self.index[w] for w in part])
            sims = self.vectors[rows] @ self.vectors.T  # n, V
            sims[torch.arange(len(part)), rows] = float("-inf")  # not the word itself
            top = sims.topk(min(k, len(self.words) - 1), dim=-1).indices.tolist()
            found.update((w, [self.words[j] for j in ids]) for w, ids in zip(part, top))
        return [found.get(w.lower(), []) for w in words]


# --------------------------------------------------------------------------------------------------- augmenting


Slot = tuple[int, int, list[str]]  # start, end of a word in its text; its candidates


class Augmenter:
    """Candidates for every eligible word of many texts at once, and the variants of one text."""

    def __init__(self, settings: AugmentSettings, mlm: MaskedLM | None, vectors: WordVectors | None):
        if settings.candidates_from in ("both", "mlm") and mlm is None:
            raise AugmentError(f"--candidates-from {settings.candidates_from} needs --mlm MODEL")
        if settings.candidates_from == "vectors" and vectors is None:
            raise AugmentError("--candidates-from vectors needs --word-vectors FILE (GloVe text format)")
        self.settings, self.mlm, self.vectors = settings, mlm, vectors
        # vectors only: BERT's split (whitespace, then punctuation)
        self.pre_tokenizer = mlm.pre_tokenizer if mlm is not None else BertPreTokenizer()

    def split(self, text: str) -> list[tuple[str, int, int]]:
        """Words with their character spans in `text` (the tokenizer's own word split: whitespace and punctuation
        for BERT)."""
        out = []
        for _, (start, end) in self.pre_tokenizer.pre_tokenize_str(text):
            word = text[start:end]
            stripped = word.strip()
            if stripped:
                start += len(word) - len(word.lstrip())
                out.append((stripped, start, start + len(stripped)))
        return out

    def candidates(self, texts: list[str]) -> list[list[Slot]]:
        """Per text, a slot per eligible word: its span and its candidates (possibly none)."""
        s, K = self.settings, self.settings.candidates
        split = [self.split(t) for t in texts]
        words = [[w for w, _, _ in ws] for ws in split]
        wanted = [[i for i, w in enumerate(ws) if is_word(w) and w.lower() not in STOP_WORDS] for ws in words]
        found: list[dict[int, list[str]]] = [{} for _ in texts]
        if s.candidates_from != "vectors":
            whole_word = s.candidates_from == "mlm" or self.vectors is None
            queries = self.mlm.queries(words, wanted, whole_word)
            for (t, k, *_), cands in zip(queries, self.mlm.fill(queries, K)):
                found[t][wanted[t][k]] = cands
        if self.vectors is not None:
            # vectors mode: every word; both: the words the MLM did not take (several pieces, or cut off)
            need = [(t, i) for t in range(len(texts)) for i in wanted[t] if i not in found[t]]
            for (t, i), cands in zip(need, self.vectors.neighbours([words[t][i] for t, i in need], K)):
                found[t][i] = cands
        return [[(split[t][i][1], split[t][i][2], found[t].get(i, [])) for i in wanted[t]] for t in range(len(texts))]

    def variants(self, text: str, slots: list[Slot], rng: random.Random) -> list[str]:
        """Up to N distinct variants of `text`, none equal to it: each slot replaced with probability p."""
        out: dict[str, None] = {}  # an ordered set: the first of equal variants keeps its place
        slots = [slot for slot in slots if slot[2]]
        for _ in range(self.settings.copies):
            pieces, last = [], 0
            for start, end, cands in slots:
                choice = rng.choice(cands)  # drawn before the coin, as the original does
                if rng.random() < self.settings.mask_prob:
                    pieces += [text[last:start], _match_case(choice, text[start:end])]
                    last = end
            out["".join(pieces) + text[last:]] = None
        out.pop(text, None)
        return list(out)


def _match_case(candidate: str, word: str) -> str:
    if word.isupper() and len(word) > 1:
        return candidate.upper()
    if word[:1].isupper():
        return candidate[:1].upper() + candidate[1:]
    return candidate


# ------------------------------------------------------------------------------------------------- train files


@dataclasses.dataclass
class Table:
    """The rows of a train file as they are (every column kept), which columns hold the text, and how to write
    rows back in the same schema: `glue` (GLUE's TSV: tabs, no quoting), `csv`, `tsv` (quoted), or `jsonl`."""

    source: str  # the file (or hub dataset) the rows came from, for messages and the fingerprint
    digest: str  # content hash of the source
    columns: list  # column names, in order; ints for a headerless GLUE file (CoLA)
    rows: list[list]
    text_fields: list[int]  # positions in a row of the text columns
    kind: str
    header: bool = True

    def format(self, rows: list[list]) -> str:
        if self.kind == "glue":
            return "".join("\t".join(str(v) for v in row) + "\n" for row in rows)
        if self.kind == "jsonl":
            return "".join(json.dumps(dict(zip(self.columns, row)), ensure_ascii=False) + "\n" for row in rows)
        buffer = io.StringIO()
        csv.writer(buffer, delimiter="\t" if self.kind == "tsv" else ",", lineterminator="\n").writerows(rows)
        return buffer.getvalue()

    def format_header(self) -> str:
        return self.format([self.columns]) if self.header and self.kind != "jsonl" else ""


def _kind(output: Path, allowed: tuple[str, ...], why: str) -> str:
    kind = output.suffix.lower().lstrip(".")
    if kind not in allowed:
        raise AugmentError(f"--output {output}: {why}; name it *.{' or *.'.join(allowed)}")
    return kind


def read_table(output: Path, task: str | None = None, data_dir: str | None = None, train: str | None = None,
               text_columns: tuple[str, ...] = (), label_column: str = "label") -> Table:
    """The train rows to augment: a GLUE task's train.tsv (all columns, as GLUE writes them), its hub dataset, or
    your own CSV/TSV/JSON/JSONL file; checked row by row (errors name the file and line)."""
    if (task is None) == (train is None):
        raise AugmentError("give either --task NAME (GLUE) or --train FILE --text-columns a[,b] (your own file)")
    if task is not None:
        spec = get_task(task)
        if data_dir is None:
            return _hub_table(spec, output)
        path = glue_file(spec, data_dir, "train")
        table, _, labels = read_glue_tsv(path, spec, labelled=True)  # checks every row, names the line of a bad one
        if not labels:
            raise DataError(f"{path}: no rows")
        _kind(output, ("tsv",), f"{spec.name}'s augmented train set is written in GLUE's TSV layout, as its train.tsv")
        rows = [list(row) for row in zip(*(table[c] for c in table.column_names))]
        headerless = isinstance(spec.tsv_columns[0], int)
        columns = list(range(spec.tsv_width)) if headerless else table.column_names
        fields = list(spec.tsv_columns[:-1]) if headerless else [columns.index(c) for c in spec.tsv_columns[:-1]]
        return Table(str(path), file_sha256(path), columns, rows, fields, "glue", header=not headerless)
    if len(text_columns) not in (1, 2):
        raise AugmentError(f"--text-columns names one or two columns, got {list(text_columns)}")
    path = Path(train)
    read_text_and_labels(path, [*text_columns, label_column])  # checks every record: missing file, empty text...
    columns, records, _ = read_records(path)
    if label_column not in records[0]:
        raise DataError(f"{path}: no label column {label_column!r} (set --label-column); the augmented rows copy it")
    rows = [[r.get(c) for c in columns] for r in records]
    kind = _kind(output, ("csv", "tsv", "jsonl"), "augmented custom rows are written as CSV, TSV or JSON Lines")
    return Table(str(path), file_sha256(path), columns, rows, [columns.index(c) for c in text_columns], kind)


def _hub_table(task: TaskSpec, output: Path) -> Table:
    kind = _kind(output, ("jsonl", "csv"), f"rows from the hub dataset nyu-mll/glue/{task.name} are written with "
                                           f"its columns ({', '.join(task.text_columns)}, label), not GLUE's TSV")
    ds = load_task(task.name, None, splits=["train"])["train"]
    n, source = len(task.text_columns), f"nyu-mll/glue/{task.name}"
    rows = [[*(r["text_a"], r.get("text_b"))[:n], r["label"]] for r in ds]
    return Table(source, ds._fingerprint, [*task.text_columns, "label"], rows, list(range(n)), kind)


# ------------------------------------------------------------------------------------------- the whole file


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun/deepspeed, starting the process group the final barrier needs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world


def augment_table(table: Table, augmenter: Augmenter, rows: range) -> str:
    """The output lines for `rows` of the table: each source row, then its variants, field by field."""
    seed, fields = augmenter.settings.seed, table.text_fields
    texts = [str(table.rows[r][f]) for r in rows for f in fields]
    slots = augmenter.candidates(texts)
    out = []
    for n, r in enumerate(rows):
        row = table.rows[r]
        out.append(row)
        for j, f in enumerate(fields):
            rng = random.Random(f"{seed}:{r}:{f}")  # str seeds hash with sha512: the same in every process
            for variant in augmenter.variants(str(row[f]), slots[n * len(fields) + j], rng):
                out.append([variant if c == f else v for c, v in enumerate(row)])
    return table.format(out)


def augment(table: Table, augmenter: Augmenter, output: str | os.PathLike, *, fingerprint: dict,
            overwrite: bool = False, echo=print, progress: bool = True) -> Path:
    """Augment every row of `table` into `output`, in shards written atomically under OUTPUT.partial/, so a killed
    run re-run with the same fingerprint goes on from the shards it finished; another fingerprint starts afresh.
    Under a launcher each rank takes every world-th shard and rank 0 writes the output."""
    from tqdm.auto import tqdm

    output = Path(output)
    work = output.with_name(output.name + ".partial")
    rank, world = _distributed()
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    shards = [range(start, min(start + SHARD_ROWS, len(table.rows))) for start in range(0, len(table.rows), SHARD_ROWS)]
    parts = [work / f"shard-{i:05d}.part" for i in range(len(shards))]
    if rank == 0:
        _prepare(work, output, digest, fingerprint, overwrite, echo)
    barrier()
    done = [i for i, part in enumerate(parts) if part.is_file()]
    if rank == 0 and done:
        echo(f"resuming: {len(done)} of {len(shards)} shards were done by an earlier run with these settings")
    mine = [i for i in range(len(shards)) if i % world == rank and i not in done]
    bar = tqdm(total=sum(len(shards[i]) for i in mine) * len(table.text_fields), unit="sent", desc="augmenting",
               disable=not progress, dynamic_ncols=True)
    for i in mine:
        _write_atomic(parts[i], augment_table(table, augmenter, shards[i]))
        bar.update(len(shards[i]) * len(table.text_fields))
    bar.close()
    barrier()
    if rank != 0:
        return output
    missing = [i for i, part in enumerate(parts) if not part.is_file()]
    if missing:
        raise AugmentError(f"shards {missing[:5]} of {work} are missing after every rank finished; re-run the "
                           f"same command to make them")
    tmp = output.with_name(f".{output.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(table.format_header())
        for part in parts:  # one shard in memory at a time
            f.write(part.read_text(encoding="utf-8"))
    os.replace(tmp, output)
    shutil.rmtree(work)
    return output


def _prepare(work: Path, output: Path, digest: str, fingerprint: dict, overwrite: bool, echo):
    """Check the output and make (or reuse) the folder of partial shards."""
    if output.is_dir():
        raise AugmentError(f"--output {output} is a directory; name a file, e.g. {output / 'train_aug.tsv'}")
    if output.exists() and not overwrite:
        raise AugmentError(f"{output} already exists; pass --overwrite to replace it, or choose another --output "
                           f"(nothing was written)")
    output.parent.mkdir(parents=True, exist_ok=True)
    stamp = work / "settings.json"
    if work.exists():
        if not stamp.is_file():
            raise AugmentError(f"{work} exists but was not made by tinybert augment; move it away and run again")
        try:
            old = json.loads(stamp.read_text())
        except ValueError:  # torn by a kill: its shards cannot be trusted to match
            old = {}
        if old.get("digest") == digest:
            return
        before = old.get("fingerprint", {})
        changed = sorted(k for k in {*before, *fingerprint} if before.get(k) != fingerprint.get(k))
        echo(f"{work} holds shards of a run with other settings ({', '.join(changed) or 'unknown'} differ): "
             f"starting afresh")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    _write_atomic(stamp, json.dumps({"digest": digest, "fingerprint": fingerprint}, indent=2) + "\n")


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_augment(*, output: str | os.PathLike, mlm: str | None = None, word_vectors: str | None = None,
                settings: AugmentSettings | None = None, task: str | None = None, data_dir: str | None = None,
                train: str | None = None, text_columns: tuple[str, ...] = (), label_column: str = "label",
                overwrite: bool = False, echo=print, progress: bool = True) -> dict:
    """`tinybert augment`: read the train rows, load the candidate sources, augment, and say how it went.

    settings=None takes the defaults, with N per task (DEFAULT_COPIES). Returns counts and timings."""
    import time

    output, rank0 = Path(output), int(os.environ.get("RANK", "0")) == 0
    if not rank0:  # under a launcher only rank 0 speaks
        echo, progress = (lambda *_: None), False
    if settings is None:
        settings = AugmentSettings(copies=DEFAULT_COPIES.get((task or "").lower(), 20))
    if settings.candidates_from != "vectors" and mlm is None:
        raise AugmentError(f"--candidates-from {settings.candidates_from} needs --mlm MODEL (a masked LM directory "
                           f"or hub id, e.g. bert-base-uncased)")
    table = read_table(output, task, data_dir, train, text_columns, label_column)
    if train is not None and Path(train).resolve() == output.resolve():
        raise AugmentError(f"--output {output} is the train file itself; choose another --output")
    started = time.perf_counter()
    device = default_device()
    precision = decide_precision(settings.precision, device).precision
    masked_lm = (MaskedLM(mlm, device, precision, pair=settings.mlm_input == "pair")
                 if mlm is not None and settings.candidates_from != "vectors" else None)
    vectors = WordVectors.load(word_vectors, settings.vectors_limit) if word_vectors else None
    augmenter = Augmenter(settings, masked_lm, vectors)  # checks that the sources the settings want are there
    loaded = time.perf_counter() - started
    fingerprint = {"format": _FORMAT, "source": table.source, "data": table.digest, "text_fields": table.text_fields,
                   "kind": table.kind, "mlm": masked_lm.digest() if masked_lm else None,
                   "vectors": vectors.digest() if vectors else None, "settings": dataclasses.asdict(settings),
                   "precision": precision, "shard_rows": SHARD_ROWS}
    sources = {"both": "MLM for one-piece words, " + ("word vectors" if vectors else "whole-word MLM") +
                       " for words of several pieces", "mlm": "MLM for every word", "vectors": "word vectors"}
    echo(f"augment: {len(table.rows)} rows of {table.source}, {len(table.text_fields)} text field(s); "
         f"N={settings.copies} K={settings.candidates} p={settings.mask_prob}; candidates: "
         f"{sources[settings.candidates_from]}" + (f"; MLM {mlm} ({precision}, {device.type}, input "
                                                   f"{settings.mlm_input})" if masked_lm else ""))
    started = time.perf_counter()
    path = augment(table, augmenter, output, fingerprint=fingerprint, overwrite=overwrite, echo=echo,
                   progress=progress)
    seconds = time.perf_counter() - started
    sentences = len(table.rows) * len(table.text_fields)
    stats = {"output": str(path), "source_rows": len(table.rows), "load_s": round(loaded, 2),
             "augment_s": round(seconds, 2), "sentences_per_s": round(sentences / max(seconds, 1e-9), 1)}
    if rank0:
        with open(path, encoding="utf-8") as f:
            stats["output_rows"] = sum(1 for _ in f) - (1 if table.format_header() else 0)
        echo(f"wrote {path}: {stats['output_rows']} rows from {len(table.rows)} "
             f"({stats['output_rows'] / len(table.rows):.1f}x) in {seconds:.1f} s, "
             f"{stats['sentences_per_s']:.0f} sentences/s")
    return stats
