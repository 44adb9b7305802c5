"""`tinybert export --format onnx` and `tinybert bench --engine onnxruntime`: the real MiniLM (no head) and a 3-layer
student fine-tuned on real SST-2 rows (with head) against transformers and tinybert's BERT under ONNX Runtime, int8
predictions against fp32 on SST-2 dev, and one-line errors that leave the model and --output untouched."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_task import cli, snapshot  # tests/test_task.py: the CLI in this process, a folder's file hashes
from tinybert import onnx_export
from tinybert.bench import run_bench
from tinybert.demo import format_summary
from tinybert.checkpoint import load_model, load_tokenizer, save_model
from tinybert.model import Bert, BertConfig
from tinybert.onnx_export import INT8_FILE, MODEL_FILE, RECORD_FILE, onnx_facts, run_session, session
from tinybert.publish import model_card
from tinybert.rundir import Bench

for _module in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_module, reason=f"{_module} is not installed: pip install -e '.[onnx]' (make install does)")
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

# Fine-tuning that makes a 3-layer student predict both SST-2 classes: 100 steps on real rows (about a minute).
STUDENT_FINETUNE = ("max_train_examples=3200", "max_eval_examples=200", "epochs=1", "learning_rate=1e-4",
                    "batch_size=32", "precision=fp32", "save_every=1000")


def sst2_dev(glue: Path, n: int) -> tuple[list[str], list[int]]:
    rows = [line.split("\t") for line in (glue / "SST-2" / "dev.tsv").read_text().splitlines()[1:n + 1]]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def two_segment_batch(tokenizer, glue: Path) -> dict:
    """Real SST-2 dev sentences as pairs of segments of different lengths, padded: token types 0 and 1, padding."""
    texts, _ = sst2_dev(glue, 10)
    return dict(tokenizer(texts[:5], texts[5:], padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def glue(data_dir) -> Path:
    return data_dir / "glue"


@pytest.fixture(scope="module")
def minilm_export(minilm_dir, module_tmp):
    """(export folder, printed output, the MiniLM's files before) for the real MiniLM, which has no head."""
    before = snapshot(minilm_dir)
    output = module_tmp / "minilm-onnx"
    code, out, err = cli("export", minilm_dir, "--format", "onnx", "--output", output)
    assert code == 0, err
    return output, out, before


@pytest.fixture(scope="module")
def student(minilm_dir, glue, module_tmp) -> Path:
    """A 3-layer student (MiniLM layers 2, 4, 6) fine-tuned on 3,200 SST-2 train rows: RUN/best with a head."""
    init = module_tmp / "student-init"
    code, _, err = cli("init", "--from-teacher", minilm_dir, "--layers", "2,4,6", "--output", init)
    assert code == 0, err
    run = module_tmp / "student-sst2"
    code, _, err = cli("finetune", "--task", "sst2", "--model", init, "--data-dir", glue, "--output", run,
                       *STUDENT_FINETUNE)
    assert code == 0, err
    return run / "best"


@pytest.fixture(scope="module")
def student_export(student, glue, module_tmp):
    """(export folder, printed output) of the student with int8; the task comes from the run's recipe.yaml."""
    output = module_tmp / "student-onnx"
    code, out, err = cli("export", student, "--output", output, "--quantize", "int8", "--data-dir", glue)
    assert code == 0, err
    return output, out


@pytest.fixture(scope="module")
def tiny(minilm_dir, module_tmp) -> Path:
    """A small random BERT with the MiniLM tokenizer: exports in seconds, for the paths that need a real trace."""
    tokenizer = load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    return save_model(Bert(config), module_tmp / "tiny", tokenizer)


# ------------------------------------------------------------------------------------------------------- parity


def test_minilm_without_head_matches_pytorch(minilm_export, minilm_dir, glue):
    output, printed, before = minilm_export
    assert snapshot(minilm_dir) == before  # the source is only read
    assert {MODEL_FILE, "config.json", "tokenizer.json", RECORD_FILE} <= {p.name for p in output.iterdir()}
    assert not (output / INT8_FILE).exists()
    record = json.loads((output / RECORD_FILE).read_text())
    assert record["output"] == "last_hidden_state" and record["inputs"] == ["input_ids", "attention_mask",
                                                                             "token_type_ids"]
    assert record["parity"]["max_abs_diff"] <= 1e-4 and "parity: ONNX Runtime fp32 vs PyTorch" in printed

    # Served as the issue says: InferenceSession(DIR/model.onnx) + AutoTokenizer(DIR), on a padded 2-segment batch.
    sess = session(output / MODEL_FILE)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(isinstance(d, str) for i in sess.get_inputs() for d in i.shape)  # batch and sequence are dynamic
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    batch = two_segment_batch(tokenizer, glue)
    assert batch["token_type_ids"].max() == 1 and batch["attention_mask"].min() == 0
    assert torch.equal(batch["input_ids"], two_segment_batch(load_tokenizer(minilm_dir), glue)["input_ids"])
    got = torch.from_numpy(run_session(sess, batch))
    with torch.no_grad():
        hf = AutoModel.from_pretrained(str(minilm_dir)).eval()(**batch).last_hidden_state
        ours = load_model(minilm_dir).eval()(batch["input_ids"], batch["attention_mask"],
                                             batch["token_type_ids"]).hidden_states[-1]
    real = batch["attention_mask"].bool()
    assert (got - hf)[real].abs().max() < 1e-4
    assert (got - ours)[real].abs().max() < 1e-4
    # Another batch size and length than the trace's example (2 x 128).
    one = dict(tokenizer(["a single short sentence"], return_tensors="pt"))
    with torch.no_grad():
        hf_one = AutoModel.from_pretrained(str(minilm_dir)).eval()(**one).last_hidden_state
    assert (torch.from_numpy(run_session(sess, one)) - hf_one).abs().max() < 1e-4


@pytest.mark.slow  # the fine-tuned student: about 2 minutes on 2 cores, once per module
def test_student_with_head_matches_pytorch_and_int8_agrees(student_export, student, glue):
    output, printed = student_export
    record = json.loads((output / RECORD_FILE).read_text())
    assert record["output"] == "logits" and record["files"] == {"fp32": MODEL_FILE, "int8": INT8_FILE}
    assert "32 dev rows" in record["parity"]["checked_on"]
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    batch = two_segment_batch(tokenizer, glue)
    fp32, int8 = session(output / MODEL_FILE), session(output / INT8_FILE)
    with torch.no_grad():
        hf = AutoModelForSequenceClassification.from_pretrained(str(student)).eval()(**batch).logits
        ours = load_model(student).eval()(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
    got = torch.from_numpy(run_session(fp32, batch))
    assert (got - hf).abs().max() < 1e-4 and (got - ours).abs().max() < 1e-4

    # int8 against fp32 on 200 real SST-2 dev sentences, batched and padded as a server would.
    texts, labels = sst2_dev(glue, 200)
    preds = {}
    for name, sess in (("fp32", fp32), ("int8", int8)):
        logits = [run_session(sess, tokenizer(texts[i:i + 50], padding=True, return_tensors="np"))
                  for i in range(0, 200, 50)]
        preds[name] = np.concatenate(logits).argmax(-1)
    assert set(preds["fp32"]) == {0, 1}  # a student that predicts both classes, so agreement means something
    assert np.mean(preds["fp32"] == np.array(labels)) > 0.6
    assert np.mean(preds["int8"] == preds["fp32"]) >= 0.95

    # The dev score recorded at export: task from the run's recipe.yaml, every dev row, same accuracy as here.
    evaluated = record["int8"]["eval"]
    assert evaluated["task"] == "sst2" and evaluated["examples"] == 872 and evaluated["metric"] == "accuracy"
    assert "recipe.yaml" in record["int8"]["eval_note"] and "int8: accuracy" in printed
    assert evaluated["agreement"] >= 0.95 and abs(evaluated["int8"] - evaluated["fp32"]) < 0.03
    # int8 activations are quantised with scales of the whole batch, so other batches flip a few rows.
    all_texts, all_labels = sst2_dev(glue, 872)
    int8_logits = [run_session(int8, tokenizer(all_texts[i:i + 64], padding=True, return_tensors="np"))
                   for i in range(0, 872, 64)]
    assert abs(np.mean(np.concatenate(int8_logits).argmax(-1) == np.array(all_labels)) - evaluated["int8"]) < 0.01


@pytest.mark.slow  # the fine-tuned student: about 2 minutes on 2 cores, once per module
def test_optimum_loads_the_export(student_export, glue):
    ort_models = pytest.importorskip("optimum.onnxruntime", reason="optimum[onnxruntime] is not installed (it "
                                                                  "pins transformers < 5; see docs/export-and-push.md)")
    output, _ = student_export
    model = ort_models.ORTModelForSequenceClassification.from_pretrained(str(output))
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    batch = two_segment_batch(tokenizer, glue)
    expected = run_session(session(output / MODEL_FILE), batch)
    assert np.abs(np.asarray(model(**batch).logits) - expected).max() < 1e-5


# -------------------------------------------------------------------------------------------- bench and card


@pytest.mark.slow  # the fine-tuned student: about 2 minutes on 2 cores, once per module
def test_bench_onnxruntime_next_to_torch(student_export, student, tmp_path):
    """The benchmark's code path at tiny sizes (figures on a shared machine mean nothing; docs/results.md has them
    from a quiet one)."""
    output, _ = student_export
    lines = []
    report = run_bench(str(output), None, "cpu", "fp32", None, lines.append, engine="onnxruntime", seq_len=16,
                       throughput_batch=4, latency_repeats=2, throughput_repeats=2)
    model, int8, torch_side = report.model, report.int8, report.vs
    assert (model.engine, model.dtype) == ("onnxruntime", "fp32")
    assert (int8.engine, int8.dtype) == ("onnxruntime", "int8")
    assert torch_side.engine == "torch" and torch_side.model == str(student.resolve())
    assert model.threads == int8.threads == torch_side.threads == torch.get_num_threads()
    assert int8.size_on_disk_bytes == (output / INT8_FILE).stat().st_size
    assert report.speedup["latency_speedup"] == pytest.approx(torch_side.latency_ms_p50 / model.latency_ms_p50)
    assert report.int8_speedup["throughput_speedup"] == pytest.approx(
        int8.throughput_seq_per_s / model.throughput_seq_per_s)
    table = lines[0]
    assert "torch fp32" in table and "onnxruntime int8" in table and "onnxruntime int8 vs fp32" in table
    assert json.loads((output / "bench.json").read_text())["int8"]["dtype"] == "int8"
    assert Bench.read(output / "bench.json") == report  # the file reads back as the schema it was written from
    assert onnx_facts(output)["speed"] == report

    # The demo's final table with these rows: ONNX Runtime fp32 and int8 columns beside torch's.
    record = json.loads((output / RECORD_FILE).read_text())
    served = {"parity_max_abs_diff": record["parity"]["max_abs_diff"], "int8_eval": record["int8"]["eval"],
              "bench": {"fp32": dataclasses.asdict(model), "int8": dataclasses.asdict(int8)}, "path": str(output)}
    summary = {"accuracy": {"teacher": 0.9, "student": record["int8"]["eval"]["fp32"]},
               "bench": {"teacher": dataclasses.asdict(torch_side), "student": dataclasses.asdict(torch_side)},
               "speedup": report.speedup, "onnx": served, "minutes": 1.0}
    text = format_summary(summary, student)
    header, accuracy, _, latency = text.splitlines()[2:6]
    assert "student, ONNX Runtime fp32" in header and header.rstrip().endswith("student, ONNX Runtime int8")
    assert accuracy.split()[-1] == f"{record['int8']['eval']['int8']:.4f}"
    assert latency.split()[-1] == f"{int8.latency_ms_p50:.1f}"
    assert f"export in {output}" in text


@pytest.mark.slow  # the fine-tuned student: about 2 minutes on 2 cores, once per module
def test_onnx_facts_for_the_card(student_export, tmp_path):
    output, _ = student_export
    record = json.loads((output / RECORD_FILE).read_text())
    facts = onnx_facts(output)
    assert facts["parity_max_abs_diff"] == record["parity"]["max_abs_diff"]
    assert facts["int8_eval"]["int8"] == record["int8"]["eval"]["int8"] and facts["files"]["int8"] == INT8_FILE
    assert onnx_facts(tmp_path) is None  # no export here
    # The usage snippet runs as printed, from the folder that holds the export.
    script = tmp_path / "usage.py"
    script.write_text("\n".join(facts["usage"]) + "\nprint(logits.shape)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=output.parent, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 2)"


@pytest.mark.slow  # the fine-tuned student, as above
def test_model_card_lists_the_student_export(student, student_export):
    """The card of the student with its export: the parity figure and the int8 SST-2 score of onnx_export.json, and
    the ONNX Runtime snippet."""
    output, _ = student_export
    record = json.loads((output / RECORD_FILE).read_text())
    score = record["int8"]["eval"]
    assert score["task"] == "sst2" and score["metric"] == "accuracy"
    text = model_card(student, onnx=output, repo_id="me/student")
    section = text[text.index("## ONNX"):text.index("## Citation")]
    assert f"differs from PyTorch by at most **{record['parity']['max_abs_diff']:.1e}** (max abs on `logits`" in section
    assert (f"- int8: SST-2 dev accuracy {score['int8']:.4f} against {score['fp32']:.4f} for fp32 "
            f"({score['examples']} rows; {score['agreement']:.1%} of predictions unchanged).") in section
    assert 'session = ort.InferenceSession(f"{folder}/model_quantized.onnx")' in section
    assert "logits = session.run(None, {k: v.astype(np.int64) for k, v in inputs.items()})[0]" in section
    assert "## ONNX" not in model_card(student)  # without --output the export went elsewhere: nothing beside it


def test_export_without_output_goes_beside_the_model_and_into_its_card(tiny, tmp_path):
    """`tinybert export MODEL_DIR` writes MODEL_DIR/onnx, which the card then describes; an export named for the
    card must be one of this model and cannot stand beside another one."""
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    before = snapshot(model)
    code, out, err = cli("export", model, "--quantize", "int8")
    assert code == 0, err
    assert f"wrote {model / 'onnx'}" in out
    after = snapshot(model)
    assert {k: v for k, v in after.items() if not k.startswith("onnx")} == before  # the model's files as they were
    assert {f"onnx/{n}" for n in (MODEL_FILE, INT8_FILE, RECORD_FILE, "config.json", "tokenizer.json")} <= set(after)
    assert not [p for p in model.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    record = json.loads((model / "onnx" / RECORD_FILE).read_text())
    text = model_card(model)
    section = text[text.index("## ONNX"):text.index("## Citation")]
    assert f"by at most **{record['parity']['max_abs_diff']:.1e}** (max abs on `last_hidden_state`" in section
    assert "- int8: not measured at export" in section  # no head, no task
    assert "Speed under ONNX Runtime was not measured" in section
    assert f'ORTModelForFeatureExtraction.from_pretrained("{model}", subfolder="onnx", ' in section

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(model / "onnx", elsewhere)
    with pytest.raises(ValueError, match="goes up with the model as onnx/, so --with-onnx .* cannot"):
        model_card(model, onnx=elsewhere)
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    config = json.loads((elsewhere / "config.json").read_text())
    (elsewhere / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.3}))
    with pytest.raises(ValueError, match="is the export of another model: its config.json differs"):
        model_card(other, onnx=elsewhere)


# ------------------------------------------------------------------------------------------------- bad input


def _one_line_error(code: int, err: str, *words: str):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def other_model(tiny, tmp_path) -> Path:
    """An --output that holds another model."""
    path = tmp_path / "other"
    save_model(load_model(tiny), path, load_tokenizer(tiny))
    return path


@pytest.mark.parametrize("case", ["not a model", "opset", "quantize", "format", "holds a model", "into source"])
def test_bad_input_is_one_line_and_touches_nothing(case, tiny, other_model, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    model, output = tiny, tmp_path / "out"
    args, words = {
        "not a model": ([folder], ["has no config.json"]),
        "opset": ([tiny, "--opset", "12"], ["--opset 12 is not supported", "18"]),
        "quantize": ([tiny, "--quantize", "int4"], ["int8 is the one"]),
        "format": ([tiny, "--format", "torchscript"], ["onnx is the one format"]),
        "holds a model": ([tiny], ["holds a model", "config.json", "--overwrite"]),
        "into source": ([tiny, "--overwrite"], ["is the model directory itself"]),
    }[case]
    if case == "holds a model":
        output = other_model
    elif case == "into source":
        output = tiny
    if case == "not a model":
        model = folder
    before = {p: snapshot(p) for p in (model, output) if p.exists()}
    code, _, err = cli("export", *args, "--output", output)
    _one_line_error(code, err, *words)
    assert {p: snapshot(p) for p in (model, output) if p.exists()} == before
    assert output.exists() == (case in ("holds a model", "into source"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_missing_onnxruntime_is_one_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    before = snapshot(tiny)
    code, _, err = cli("export", tiny, "--output", tmp_path / "out")
    _one_line_error(code, err, "onnxruntime", "pip install 'tinybert[onnx]'")
    assert snapshot(tiny) == before and not (tmp_path / "out").exists()
    code, _, err = cli("bench", tmp_path, "--engine", "onnxruntime")
    _one_line_error(code, err, "onnxruntime", "pip install 'tinybert[onnx]'")


def test_failed_parity_writes_nothing(tiny, tmp_path, monkeypatch):
    """A graph that does not match PyTorch within the tolerance is an error, and nothing reaches --output (here the
    tolerance is 0, which no float graph meets)."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    before = snapshot(output)
    monkeypatch.setattr(onnx_export, "PARITY_TOLERANCE", 0.0)
    code, _, err = cli("export", tiny, "--output", output, "--overwrite")
    _one_line_error(code, err, "parity check failed", "nothing was written")
    assert snapshot(output) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_an_export_and_drops_a_stale_int8(tiny, tmp_path):
    output = tmp_path / "out"
    code, out, err = cli("export", tiny, "--output", output, "--quantize", "int8", "--opset", "20")
    assert code == 0, err
    assert "accuracy not measured: the model has no task head" in out
    assert json.loads((output / RECORD_FILE).read_text())["opset"] == 20
    code, _, err = cli("export", tiny, "--output", output)  # an export is there: --overwrite is needed
    _one_line_error(code, err, "holds a model")
    code, _, err = cli("export", tiny, "--output", output, "--overwrite")
    assert code == 0, err
    assert not (output / INT8_FILE).exists() and "int8" not in json.loads((output / RECORD_FILE).read_text())
