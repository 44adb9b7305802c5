"""`tinybert report`: plots and a Markdown summary from a log.jsonl written by a real (short) distillation run, and
from a longer two-stage log; one-line errors for directories it cannot read."""

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tinybert.report import ReportError, write_report

REPO = Path(__file__).resolve().parents[1]


def tinybert(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TINYBERT_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "tinybert.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def real_run(module_tmp, minilm_dir, data_dir) -> Path:
    """Six steps of general distillation of the MiniLM teacher on one book, evaluated every third step (~40 s)."""
    from tinybert.general import run_general
    from tinybert.recipe import load_recipe

    book = data_dir / "corpus" / "gutenberg" / "pg11_alices_adventures_in_wonderland.txt"
    if not book.is_file():
        pytest.skip(f"{book} is missing")
    output = module_tmp / "general"
    recipe = load_recipe("general", ["batch_size=4", "max_seq_length=32", "max_steps=6", "eval_every=3",
                                     "precision=fp32", "layer_map=[0,2,3,5,6]"])
    run_general(recipe, teacher=str(minilm_dir), corpus=[str(book)], output=output, progress=False,
                echo=lambda *a: None)
    return output


def test_report_on_a_real_run(real_run):
    result = tinybert("report", real_run)
    assert result.returncode == 0, result.stderr
    assert "report.md" in result.stdout
    out = real_run / "report"
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"general-losses.png", "general-schedule.png", "general-eval.png"}
    for name in pngs:
        width, height = png_size(out / name)
        assert 500 <= width <= 2000 and 300 <= height <= 2000, (name, width, height)
        assert (out / name).stat().st_size > 20_000  # curves, labels and titles, not an empty canvas

    report = (out / "report.md").read_text()
    assert "## general" in report and "6 training steps" in report and "2 evaluations" in report
    for term in ("loss", "embedding", "hidden", "attention"):
        assert re.search(rf"^\| {term} \| [\d.e+-]+ \| [\d.e+-]+ \| [\d.e+-]+ \(\d\) \|", report, re.M), term
    assert "Final evaluation (step 6)" in report
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert set(links) == pngs
    first = json.loads((real_run / "log.jsonl").read_text().splitlines()[0])
    assert f"| embedding | {first['embedding']:.4g} |" in report


def test_report_task_distillation_layout_long_log_and_out(tmp_path):
    """A task distillation keeps one log per stage (stage1/log.jsonl, stage2/log.jsonl, the latter opening with a
    teacher_logits record) and one recipe per stage in recipe.yaml."""
    run = tmp_path / "task"
    run.mkdir()
    (run / "recipe.yaml").write_text("stage1:\n  layer_map: [0, 6, 12]\n  batch_size: 32\n"
                                     "stage2:\n  terms: {prediction: 1.0}\n  temperature: 2.0\n"
                                     "teacher: my/teacher\ntask: sst2\n")
    records = [{"stage": "stage2", "kind": "teacher_logits", "step": 0, "rows": 100}]
    for step in range(1, 301):  # a noisy decay over two decades: smoothed, log scale
        noise = 1 + 0.2 * math.sin(step * 1.7)
        records.append({"stage": "stage1", "kind": "train", "step": step, "epoch": step // 100,
                        "loss": 100 * math.exp(-step / 60) * noise + 0.5, "hidden": 50 * math.exp(-step / 60) * noise,
                        "attention": 50 * math.exp(-step / 50) + 0.5, "lr": 1e-4 * min(1, step / 30) * (1 - step / 300),
                        "grad_norm": None, "tokens_per_s": 5000 + step})
        if step % 50 == 0:
            records.append({"stage": "stage1", "kind": "eval", "step": step, "epoch": step // 100,
                            "loss": 110 * math.exp(-step / 60) + 0.6})
    for step in range(1, 41):
        records.append({"stage": "stage2", "kind": "train", "step": step, "epoch": 0, "loss": 1 / step,
                        "prediction": 1 / step, "lr": 3e-5, "tokens_per_s": 9000.0})
        if step % 10 == 0:
            records.append({"stage": "stage2", "kind": "eval", "step": step, "epoch": 0,
                            "accuracy": 0.5 + step / 100, "f1": 0.4 + step / 100})
    for stage in ("stage1", "stage2"):
        (run / stage).mkdir()
        (run / stage / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["stage"] == stage)
                                               + '{"stage": "sta')  # a run killed mid-write

    path = write_report(run, tmp_path / "out")
    assert path == tmp_path / "out" / "report.md" and not (run / "report").exists()
    names = {p.name for p in path.parent.glob("*.png")}
    assert names == {f"{s}-{kind}.png" for s in ("stage1", "stage2") for kind in ("losses", "schedule", "eval")}
    report = path.read_text()
    assert "## stage1" in report and "## stage2" in report and "300 training steps" in report
    assert "| grad_norm" not in report  # never logged as a number: not plotted, not tabled
    assert "| accuracy | 0.9 |" in report and "| f1 | 0.8 |" in report
    assert re.search(r"^\| prediction \| 1 \| 0.025 \| 0.025 \(40\) \| 1 \(1\) \|", report, re.M)
    assert "- teacher: `my/teacher`" in report and "- stage1:\n  - layer_map: `[0, 6, 12]`" in report
    assert "  - temperature: `2.0`" in report


def test_report_errors_are_one_line(tmp_path):
    result = tinybert("report", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path} has no log.jsonl; give a run directory written by " \
                                    f"tinybert distill or finetune"
    assert not (tmp_path / "report").exists()

    (tmp_path / "log.jsonl").write_text('{"stage": "general", "kind": "train", "step": 1, "loss": 1.0}\nnot json\n'
                                        '{"stage": "general", "kind": "train", "step": 2, "loss": 0.5}\n')
    with pytest.raises(ReportError, match="line 2 is not JSON"):
        write_report(tmp_path)
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(ReportError, match="no records"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "missing")
