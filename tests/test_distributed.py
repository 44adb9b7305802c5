"""Fine-tuning and task distillation (both stages) under `torchrun --nproc_per_node 2` (gloo on CPU), on real SST-2
rows with the real MiniLM, against one-process runs of the same global batch.

The one-process reference runs batch_size=16 with grad_accum=2: micro-batches of 8, the micro-batch size of each
of the two processes, so both read the same length-grouped micro-batches of the same plan, and one optimizer step
covers the same 16 rows. The 2-process weights then match the reference within summation order only if each rank
took its own half of the rows (had both taken the same ones, half the rows would be missing from every update), the
gradients were averaged across the ranks and the global batch is the recipe's. Dropout is off in the models (a copy
of the MiniLM with dropout 0), since the two runs draw their masks from different generators.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import checkpoint_steps, kill_after_first_checkpoint, ok, records, tinybert  # tests/launch.py

ROWS, BATCH = 64, 16  # 4 optimizer steps an epoch
COMMON = (f"max_train_examples={ROWS}", "max_eval_examples=32", f"batch_size={BATCH}", "precision=fp32",
          "save_every=2", "keep_checkpoints=10")
# Measured on CPU: at most 3e-6 of a tensor's update (fine-tuning, 8 steps; task distillation, 4 + 8 steps).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def no_dropout(minilm_dir, module_tmp) -> Path:
    """A copy of the MiniLM with dropout 0 in its config.json."""
    path = module_tmp / "minilm-no-dropout"
    shutil.copytree(minilm_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def glue(data_dir) -> Path:
    return data_dir / "glue"


def finetune_args(model: Path, glue: Path, output: Path, *extra) -> tuple:
    return ("finetune", "--task", "sst2", "--model", model, "--data-dir", glue, "--output", output, *COMMON,
            "epochs=2", *extra)


def distill_args(teacher: Path, student: Path, glue: Path, output: Path, *extra) -> tuple:
    return ("distill", "--recipe", "task", "--task", "sst2", "--teacher", teacher, "--student", student,
            "--data-dir", glue, "--output", output, *COMMON, "stage1.epochs=1", "stage2.epochs=2", *extra)


@pytest.fixture(scope="module")
def finetuned(no_dropout, glue, module_tmp) -> dict:
    """nproc -> (run directory, stdout): the fine-tune on 2 processes, and its one-process reference."""
    runs = {}
    for nproc, extra in ((2, ()), (1, ("grad_accum=2",))):
        output = module_tmp / f"finetune-{nproc}"
        runs[nproc] = output, ok(tinybert(*finetune_args(no_dropout, glue, output, *extra), nproc=nproc)).stdout
    return runs


@pytest.fixture(scope="module")
def distilled(finetuned, no_dropout, glue, module_tmp) -> dict:
    """nproc -> (run directory, stdout): task distillation of the one-process fine-tune into 2 of its layers."""
    student = module_tmp / "student"
    ok(tinybert("init", "--from-teacher", no_dropout, "--layers", "3,6", "--output", student))
    teacher = finetuned[1][0] / "best"
    runs = {}
    for nproc, extra in ((2, ()), (1, ("grad_accum=2",))):
        output = module_tmp / f"distill-{nproc}"
        runs[nproc] = output, ok(tinybert(*distill_args(teacher, student, glue, output, *extra), nproc=nproc)).stdout
    return runs


def files(directory: Path) -> list[str]:
    """Paths under `directory`, TensorBoard's event files by their stem (the rest of the name is time and pid)."""
    return sorted(re.sub(r"(events\.out\.tfevents)\..*", r"\1", str(p.relative_to(directory)))
                  for p in directory.rglob("*"))


def assert_same_update(one: Path, two: Path, initial: dict):
    """The two runs' weights differ by at most TOLERANCE of the update each tensor received."""
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys()
    moved = 0
    for name in a:
        update = (a[name] - initial[name]).norm().item() if name in initial else a[name].norm().item()
        moved += update > 0
        diff = (b[name] - a[name]).norm().item()
        assert diff <= TOLERANCE * update + 1e-7, f"{name}: |2 procs - 1 proc| {diff:.3g}, |update| {update:.3g}"
    assert moved > len(a) // 2


def assert_one_writer(one: Path, two: Path):
    """The 2-process run wrote the files of the 1-process run and no others, except each rank's own part of a
    checkpoint (its RNG state)."""
    rank1 = [f for f in files(two) if "/rank1" in f]
    assert rank1 and all(re.match(r"(stage\d/)?checkpoints/step-\d+/rank1", f) for f in rank1), rank1
    assert [f for f in files(two) if f not in rank1] == files(one)


def test_finetune_on_two_processes_is_the_one_process_run(finetuned, no_dropout):
    (two, printed), (one, _) = finetuned[2], finetuned[1]
    steps = ROWS // BATCH * 2
    for run in (one, two):
        train = records(run, "train")
        assert [r["step"] for r in train] == list(range(1, steps + 1))  # 2 epochs at the global batch of 16
        assert [r["epoch"] for r in train] == [0] * (steps // 2) + [1] * (steps // 2)
        assert [r["step"] for r in records(run, "eval")] == [steps // 2, steps]
    assert printed.count("best accuracy") == 1, printed  # rank 1 prints nothing
    assert checkpoint_steps(two) == [2, 4, 6, 8]
    assert_one_writer(one, two)
    initial = load_file(no_dropout / "model.safetensors")
    assert_same_update(one / "last" / "model.safetensors", two / "last" / "model.safetensors", initial)
    history = [json.loads((run / "metrics.json").read_text())["history"] for run in (one, two)]
    assert [h["accuracy"] for h in history[0]] == pytest.approx([h["accuracy"] for h in history[1]], abs=1 / 32)


def test_task_distillation_on_two_processes_is_the_one_process_run(distilled, module_tmp):
    (two, printed), (one, _) = distilled[2], distilled[1]
    per_epoch = ROWS // BATCH
    for run in (one, two):
        assert [r["step"] for r in records(run / "stage1", "train")] == list(range(1, per_epoch + 1))
        assert [r["step"] for r in records(run / "stage2", "train")] == list(range(1, 2 * per_epoch + 1))
    assert printed.count("teacher logits: computed") == 1, printed  # by rank 0, read from the cache by rank 1
    assert printed.count("best accuracy") == 1, printed
    assert_one_writer(one, two)
    initial = load_file(module_tmp / "student" / "model.safetensors")
    for export in ("stage1/student", "last"):
        assert_same_update(one / export / "model.safetensors", two / export / "model.safetensors", initial)


def test_a_killed_two_process_finetune_resumes_to_the_same_weights(finetuned, no_dropout, glue, tmp_path):
    reference = finetuned[2][0]
    args = finetune_args(no_dropout, glue, tmp_path / "run")
    kill_after_first_checkpoint(args, tmp_path / "run", ROWS // BATCH * 2, nproc=2)
    ok(tinybert(*args, "--resume", nproc=2))
    assert [r["step"] for r in records(tmp_path / "run", "train")] == list(range(1, ROWS // BATCH * 2 + 1))
    expected = load_file(reference / "last" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "run" / "last" / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_a_two_process_task_distillation_killed_in_stage2_resumes_to_the_same_weights(distilled, finetuned,
                                                                                       glue, module_tmp, tmp_path):
    reference = distilled[2][0]
    run = tmp_path / "run"
    args = distill_args(finetuned[1][0] / "best", module_tmp / "student", glue, run)
    kill_after_first_checkpoint(args, run, 2 * ROWS // BATCH, nproc=2, stage="stage2")
    result = ok(tinybert(*args, "--resume", nproc=2))
    assert result.stdout.count("resuming stage 2 from") == 1, result.stdout
    assert [r["step"] for r in records(run / "stage2", "train")] == list(range(1, 2 * ROWS // BATCH + 1))
    expected = load_file(reference / "last" / "model.safetensors")
    for name, tensor in load_file(run / "last" / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
