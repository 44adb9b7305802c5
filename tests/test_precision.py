"""`precision: auto` by measurement: the probe's verdict in both directions (faked through `measure`), the cache
(reused, per key, a corrupt file ignored and rewritten), and the decision printed by a dry run of every recipe."""

import json

import pytest
import torch

from tinybert import precision
from tinybert.general import run_general
from tinybert.recipe import load_recipe
from tinybert.task import TaskSource, run_finetune


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYBERT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


def fake_probe(monkeypatch, ratio):
    calls = []
    monkeypatch.setattr(precision, "measure", lambda *a, **k: calls.append(a) or ratio)
    return calls


@pytest.mark.parametrize("ratio, expected", [(4.6, "bf16"), (0.5, "fp32"), (1.2, "fp32")])
def test_auto_follows_the_measured_ratio(cache, monkeypatch, ratio, expected):
    calls = fake_probe(monkeypatch, ratio)
    verdict = precision.resolve("auto", torch.device("cpu"), hidden=384, intermediate=1536)
    assert (verdict.precision, verdict.how, verdict.ratio) == (expected, "probe", ratio)
    assert calls and calls[0][1:3] == (384, 1536)
    assert f"precision: {expected} (auto: bf16 matmul {ratio:.1f}x fp32 on this CPU;" in verdict.describe()
    again = precision.resolve("auto", torch.device("cpu"), hidden=384, intermediate=1536)
    assert (again.precision, again.how, len(calls)) == (expected, "cache", 1)  # no second probe
    assert ", cached;" in again.describe()


def test_forcing_either_precision_skips_the_probe(cache, monkeypatch):
    calls = fake_probe(monkeypatch, 4.6)
    for forced in ("fp32", "bf16"):
        verdict = precision.resolve(forced, torch.device("cpu"))
        assert (verdict.precision, verdict.how) == (forced, "recipe")
    assert not calls and not cache.exists()


def test_cache_is_keyed_by_shape_and_threads_and_a_corrupt_one_is_rewritten(cache, monkeypatch):
    calls = fake_probe(monkeypatch, 3.0)
    precision.resolve("auto", torch.device("cpu"), hidden=384, intermediate=1536)
    precision.resolve("auto", torch.device("cpu"), hidden=768, intermediate=3072)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        precision.resolve("auto", torch.device("cpu"), hidden=384, intermediate=1536)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3 and len(json.loads(cache.read_text())["verdicts"]) == 3
    for junk in ("{not json", "[]", '{"format": 1, "verdicts": {"x": 1}}', '{"format": 1, "verdicts": 3}'):
        cache.write_text(junk)
        verdict = precision.resolve("auto", torch.device("cpu"), hidden=384, intermediate=1536)
        assert verdict.how == "probe" and verdict.precision == "bf16"
        assert any(k.endswith("2048x384x1536") for k in json.loads(cache.read_text())["verdicts"])


def test_the_real_probe_measures_both_precisions():
    ratio = precision.measure(torch.device("cpu"), 64, 256, tokens=64, budget_s=0.05)
    assert 0 < ratio < 100


@pytest.mark.parametrize("ratio, expected", [(4.6, "bf16"), (0.5, "fp32")])
def test_dry_runs_print_the_decision(cache, monkeypatch, minilm_dir, data_dir, tmp_path, ratio, expected):
    fake_probe(monkeypatch, ratio)
    lines = []
    run_general(load_recipe("general", ["layer_map=[0,2,3,5,6]"]), teacher=str(minilm_dir),
                corpus=[str(data_dir / "corpus" / "tinyshakespeare")], output=tmp_path / "g", dry_run=True,
                echo=lines.append)
    run_finetune(load_recipe("finetune", ["max_train_examples=64", "max_eval_examples=32"]),
                 TaskSource(task="sst2", data_dir=str(data_dir / "glue")), model=str(minilm_dir), output=tmp_path / "f",
                 dry_run=True, echo=lines.append)
    decisions = [line for line in lines if line.startswith("precision: ")]
    assert len(decisions) == 2 and all(line.startswith(f"precision: {expected} (auto: bf16 matmul {ratio:.1f}x")
                                       for line in decisions)
    forced = []
    run_general(load_recipe("general", ["layer_map=[0,2,3,5,6]", "precision=fp32"]), teacher=str(minilm_dir),
                corpus=[str(data_dir / "corpus" / "tinyshakespeare")], output=tmp_path / "g", dry_run=True,
                echo=forced.append)
    assert "precision: fp32 (set in the recipe)" in forced


def test_bf16_run_with_a_bf16_teacher_matches_fp32_terms(minilm_dir, data_dir):
    """A bf16 run holds the frozen teacher in bf16 weights (train.teacher_dtype) and the student under autocast:
    every loss term of one real SST-2 batch within 1% (relative) of the fp32 run's; seen: <= 5e-4."""
    from tinybert.checkpoint import load_model, load_tokenizer
    from tinybert.distill import Distiller
    from tinybert.model import Bert, BertConfig
    from tinybert.recipe import build_recipe
    from tinybert.train import build_engine, teacher_dtype

    teacher, tok = load_model(minilm_dir), load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    student = Bert(BertConfig.preset("tinybert-4l-312d", num_attention_heads=12))
    lines = (data_dir / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:33]
    enc = tok([line.split("\t")[0] for line in lines], padding=True, return_tensors="pt")
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.token_type_ids}
    distiller = Distiller(teacher, student, [0, 2, 3, 5, 6]).eval()
    terms = {}
    for mode in ("fp32", "bf16"):
        teacher.to(teacher_dtype(mode))
        engine = build_engine(distiller, build_recipe({}, precision=mode), 10, torch.device("cpu"))
        with torch.no_grad():
            terms[mode] = {k: v.item() for k, v in engine(batch).items()}
        assert all(v.dtype == teacher_dtype(mode) for v in teacher.parameters())
    assert set(terms["fp32"]) == {"embedding", "hidden", "attention"}
    for name, value in terms["fp32"].items():
        assert abs(terms["bf16"][name] - value) <= 1e-2 * abs(value), (name, terms)
