"""Runs that survive damage and interruption, as a user meets them (issue 14): checkpoints load with
weights_only=True (a crafted pickle is refused and its code never runs), every checkpoint carries a manifest that
--resume checks first (a damaged newest checkpoint is passed over for the previous one, or the run stops naming what
to delete), a torn log line from a kill -9 is dropped, Ctrl-C and SIGTERM stop after a checkpoint with exit 130 and
the --resume command, and a run killed with SIGKILL mid-step or mid-checkpoint-write resumes to the very same
student. Every case checks that the teacher, the student it started from and the corpus did not change.

Runs are tiny (a 2-layer, 96-wide student under the real MiniLM, batches of 2 x 16 tokens of a real book, 6 steps)
so each takes seconds of CPU.
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinybert.rundir import Metrics, RunDir, manifest_problem, write_manifest

from launch import _command, _env, checkpoint_steps, kill_after_first_checkpoint, kill_run, logged_steps, ok, tinybert
from test_general import CAROL, assert_log_has_each_step_once, error_line, save_student, snapshot

STEPS = 6
ARGS = ("batch_size=2", "max_seq_length=16", f"max_steps={STEPS}", "save_every=2", "log_every=1",
        "heldout_fraction=0", "precision=fp32", "learning_rate=2e-4")


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inputs(minilm_dir, data_dir, module_tmp) -> dict:
    corpus = data_dir / "corpus" / "gutenberg" / CAROL
    if not corpus.is_file():
        pytest.skip(f"{corpus} not found")
    student = save_student(module_tmp / "student-init", minilm_dir, hidden_size=96, num_hidden_layers=2,
                           num_attention_heads=12, intermediate_size=192)
    return {"teacher": minilm_dir, "student": student, "corpus": corpus}


def command(inputs: dict, output: Path, *extra) -> list:
    return ["distill", "--recipe", "general", "--teacher", inputs["teacher"], "--student", inputs["student"],
            "--corpus", inputs["corpus"], "--output", output, *ARGS, *extra]


def outside(inputs: dict) -> dict:
    """Hashes of everything a run reads and must never write: the teacher, the student it starts from, the corpus."""
    return {"teacher": snapshot(inputs["teacher"]), "student": snapshot(inputs["student"]),
            "corpus": hashlib.sha256(inputs["corpus"].read_bytes()).hexdigest()}


@pytest.fixture(scope="module")
def reference(inputs, module_tmp) -> Path:
    """An uninterrupted run: checkpoints at steps 4 and 6 (keep_checkpoints 2), the student every other run here
    must end with, bit for bit."""
    output = module_tmp / "reference"
    ok(tinybert(*command(inputs, output)))
    assert checkpoint_steps(output) == [4, 6]
    return output


def copy_run(reference: Path, tmp_path: Path) -> Path:
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    return output


def assert_same_student(output: Path, reference: Path):
    a = (reference / "student" / "model.safetensors").read_bytes()
    assert (output / "student" / "model.safetensors").read_bytes() == a, "the resumed student differs"
    assert_log_has_each_step_once(output, STEPS)
    assert not list((output / "checkpoints").glob(".tmp-*"))


def refused_resume(inputs: dict, output: Path) -> str:
    """--resume on `output` that must stop: exit 1, one error line (returned), nothing changed in or outside the
    run."""
    before = outside(inputs), snapshot(output)
    result = tinybert(*command(inputs, output), "--resume")
    line = error_line(result)
    assert result.returncode == 1
    assert (outside(inputs), snapshot(output)) == before
    return line


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


# ---------------------------------------------------------------------------------------------------- format


def test_a_checkpoint_is_tensors_json_and_a_manifest(reference):
    step = reference / "checkpoints" / f"step-{STEPS:07d}"
    assert sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()) == [
        "manifest.json", "rank0/rng.pt", "rank0/state.json", "rank0/state.pt"]
    state = torch.load(step / "rank0" / "state.pt", weights_only=True)
    assert {"module", "optimizer", "scheduler", "micro_steps"} == state.keys()
    rng = torch.load(step / "rank0" / "rng.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in rng.values()) and {"python", "numpy", "torch"} <= rng.keys()
    loop = json.loads((step / "rank0" / "state.json").read_text())
    assert (loop["stage"], loop["step"]) == ("general", STEPS) and set(loop["rng"]) == {"python", "numpy"}
    manifest = json.loads((step / "manifest.json").read_text())["files"]
    assert manifest["rank0/state.pt"] == {"size": (step / "rank0" / "state.pt").stat().st_size,
                                          "sha256": hashlib.sha256((step / "rank0" / "state.pt").read_bytes())
                                          .hexdigest()}
    assert manifest_problem(step) is None


def test_manifest_names_what_is_wrong(tmp_path):
    folder = tmp_path / "step-0000001"
    (folder / "rank0").mkdir(parents=True)
    (folder / "rank0" / "state.pt").write_bytes(b"0123456789")
    assert manifest_problem(folder) == "no manifest.json: its write never finished, or an older tinybert wrote it"
    write_manifest(folder)
    assert manifest_problem(folder) is None
    (folder / "extra.pt").write_bytes(b"x")
    assert manifest_problem(folder) == "extra.pt is not in its manifest.json"
    (folder / "extra.pt").unlink()
    (folder / "rank0" / "state.pt").write_bytes(b"0123456788")
    assert manifest_problem(folder) == "rank0/state.pt differs from its manifest.json (sha256)"
    (folder / "rank0" / "state.pt").write_bytes(b"01234")
    assert manifest_problem(folder) == "rank0/state.pt has 5 bytes, its manifest.json says 10"
    (folder / "manifest.json").write_text('{"format": 1, "files": {"rank0/sta')
    assert manifest_problem(folder) == "its manifest.json is unreadable"


def test_odd_folders_under_checkpoints_are_not_checkpoints(tmp_path):
    run = RunDir(tmp_path)
    for name in ("step-0000002", "step-abc", "step-", "step-0000010", ".tmp-step-0000012", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in run.checkpoints()] == ["step-0000002", "step-0000010"]
    assert [p.name for p in run.odd_checkpoints()] == ["notes", "step-", "step-abc"]
    assert [p.name for p in run.unfinished_checkpoints()] == [".tmp-step-0000012"]


# ---------------------------------------------------------------------------------------------------- hostile


class Payload:
    """Unpickling this object calls open(marker, "w"): the file appears when, and only when, its code runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_crafted_pickle_in_state_pt_is_refused_and_never_runs(inputs, reference, tmp_path):
    output = copy_run(reference, tmp_path)
    step = output / "checkpoints" / f"step-{STEPS:07d}"
    marker = tmp_path / "payload-ran"
    torch.save({"module": Payload(marker)}, step / "rank0" / "state.pt")
    write_manifest(step)  # as its maker would: the manifest checks damage, weights_only the content
    line = refused_resume(inputs, output)
    assert line == (f"error: {step / 'rank0' / 'state.pt'} holds pickled objects besides tensors; refused to load "
                    f"it (weights_only): a checkpoint tinybert writes never does, so this one was altered or made "
                    f"elsewhere; do not resume from it"), line
    assert not marker.exists()
    # The payload is live: an unguarded load runs it (so the test above could fail).
    torch.load(step / "rank0" / "state.pt", weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------- damage


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {  # what is done to the newest checkpoint's rank0/state.pt -> the reason --resume gives
    "truncated": (_truncate, "rank0/state.pt has {half} bytes, its manifest.json says {size}"),
    "deleted": (Path.unlink, "rank0/state.pt is missing"),
    "flipped byte": (_flip, "rank0/state.pt differs from its manifest.json (sha256)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, inputs, reference, tmp_path):
    output = copy_run(reference, tmp_path)
    shutil.rmtree(output / "student")
    newest, previous = (output / "checkpoints" / f"step-{s:07d}" for s in (STEPS, 4))
    size = (newest / "rank0" / "state.pt").stat().st_size
    harm, reason = DAMAGE[damage]
    harm(newest / "rank0" / "state.pt")
    before = outside(inputs)
    result = ok(tinybert(*command(inputs, output), "--resume"))
    assert "Traceback" not in result.stderr
    assert lines_with(result.stdout, "warning:") == [
        f"warning: damaged checkpoint {newest} ({reason.format(half=size // 2, size=size)}); resuming from the "
        f"previous complete one, step-0000004"]
    assert f"resuming from {previous} (step 4 of {STEPS})" in result.stdout
    assert_same_student(output, reference)
    assert manifest_problem(newest) is None  # written again by the resumed run
    assert outside(inputs) == before


def test_no_complete_checkpoint_stops_in_one_line_naming_what_to_delete(inputs, reference, tmp_path):
    output = copy_run(reference, tmp_path)
    newest, previous = (output / "checkpoints" / f"step-{s:07d}" for s in (STEPS, 4))
    _flip(newest / "rank0" / "state.pt")
    (previous / "manifest.json").unlink()
    line = refused_resume(inputs, output)
    assert line == (f"error: --resume: no complete checkpoint: damaged {newest} (rank0/state.pt differs from its "
                    f"manifest.json (sha256)); {previous} (no manifest.json: its write never finished, or an older "
                    f"tinybert wrote it); delete those folders and start again with --overwrite"), line


def test_torn_log_line_odd_folder_and_unfinished_write_do_not_block_resume(inputs, reference, tmp_path):
    """What a kill -9 leaves (half a log line, a .tmp-step- folder without its manifest) and a folder someone put
    under checkpoints/: --resume says so in one line each, and ends with the uninterrupted run's student."""
    output = copy_run(reference, tmp_path)
    shutil.rmtree(output / "student")
    shutil.rmtree(output / "checkpoints" / f"step-{STEPS:07d}")
    unfinished = output / "checkpoints" / f".tmp-step-{STEPS:07d}"
    shutil.copytree(output / "checkpoints" / "step-0000004", unfinished)
    (unfinished / "manifest.json").unlink()
    _truncate(unfinished / "rank0" / "state.pt")
    (output / "checkpoints" / "step-abc").mkdir()
    log = output / "log.jsonl"
    log.write_text(log.read_text() + '{"stage": "general", "kind": "train", "step": 7, "lo')
    before = outside(inputs)
    result = ok(tinybert(*command(inputs, output), "--resume"))
    assert lines_with(result.stdout, "note:") == [
        f"note: ignoring {output / 'checkpoints' / 'step-abc'}: not a checkpoint folder (those are named "
        f"step-NNNNNNN)",
        f"note: dropped the torn last line of {log} (a run killed while writing it)"]
    assert f"resuming from {output / 'checkpoints' / 'step-0000004'} (step 4 of {STEPS})" in result.stdout
    assert_same_student(output, reference)
    assert (output / "checkpoints" / "step-abc").is_dir()  # not ours: left alone
    assert outside(inputs) == before


def test_readers_of_run_files_survive_torn_writes(reference, tmp_path):
    """report and publish read log.jsonl, metrics.json and recipe.yaml that a killed run may have torn."""
    from tinybert.publish import read_run
    from tinybert.report import read_log

    output = copy_run(reference, tmp_path)
    complete = read_log(output / "log.jsonl")
    (output / "log.jsonl").write_text((output / "log.jsonl").read_text() + '{"stage": "gen')
    assert read_log(output / "log.jsonl") == complete
    assert read_run(output).records == complete
    metrics = Metrics(task="sst2", main_metric="accuracy", best=None, last=None, history=[])
    metrics.write(output / "metrics.json")
    text = (output / "metrics.json").read_text()
    (output / "metrics.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"^{re.escape(str(output / 'metrics.json'))} is not valid JSON"):
        read_run(output)
    result = tinybert("report", output, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------- interrupted


def _wait_for_step(proc: subprocess.Popen, output: Path, step: int, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while not (logged := logged_steps(output)) or logged[-1] < step:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_after_a_checkpoint_and_exit_130(sig, inputs, reference, tmp_path):
    output = tmp_path / "run"
    before = outside(inputs)
    # Output to files: progress bars would fill a pipe nobody reads until the end, and block the run.
    with (tmp_path / "stdout").open("w") as out, (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen(_command(command(inputs, output)), cwd=Path(__file__).parents[1], env=_env(),
                                stdout=out, stderr=err)
        _wait_for_step(proc, output, 1)
        proc.send_signal(sig)
        proc.wait(timeout=900)
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    step = checkpoint_steps(output)[-1]
    assert step < STEPS, "the signal came after the last step"
    last = err.splitlines()[-1]
    resume = shlex.join(_command(command(inputs, output)) + ["--resume"])
    assert last == (f"{sig.name}: stopped after step {step}; checkpoint {output / 'checkpoints' / f'step-{step:07d}'} "
                    f"written; continue with: {resume}"), last
    assert logged_steps(output)[-1] == step and not list((output / "checkpoints").glob(".tmp-*"))
    assert manifest_problem(output / "checkpoints" / f"step-{step:07d}") is None
    # The printed command, as printed, finishes the run.
    ok(subprocess.run(shlex.split(resume), cwd=Path(__file__).parents[1], env=_env(), capture_output=True,
                      text=True, timeout=900))
    assert_same_student(output, reference)
    assert outside(inputs) == before


def _kill_during_checkpoint_write(args: list, output: Path, timeout: float = 900):
    """Start the run and SIGKILL it while its second checkpoint is being written (its .tmp-step- folder exists)."""
    proc = subprocess.Popen(_command(args), cwd=Path(__file__).parents[1], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not (checkpoint_steps(output) if (output / "checkpoints").is_dir() else []):
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.02)
        while not list((output / "checkpoints").glob(".tmp-step-*")):
            assert proc.poll() is None, "the run ended before it was killed mid-write"
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            kill_run(proc)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("when", ["mid-step", "mid-checkpoint-write"])
def test_a_run_killed_with_sigkill_resumes_to_the_same_student(when, inputs, reference, tmp_path):
    output = tmp_path / "run"
    before = outside(inputs)
    args = command(inputs, output)
    if when == "mid-step":
        kill_after_first_checkpoint(args, output, STEPS)
    else:
        _kill_during_checkpoint_write(args, output)
    assert not (output / "student").exists()
    ok(tinybert(*args, "--resume"))
    assert_same_student(output, reference)
    assert outside(inputs) == before


def test_ctrl_c_before_training_is_exit_130_not_0(tmp_path):
    """Outside the loop (here: while the CLI starts) a Ctrl-C ends the command with 130, not a silent 0."""
    # A terminal's Ctrl-C: Python's own SIGINT handler (a process started in the background by a shell inherits
    # SIGINT ignored, and Python then installs none), the signal raised in the main thread, then a sleep it
    # interrupts, so the handler runs before load_model returns.
    code = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv = ['tinybert', 'info', 'bert-base']; "
            "import tinybert.checkpoint as c; "
            "c.load_model = lambda m: (signal.raise_signal(signal.SIGINT), time.sleep(60)); "
            "from tinybert.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines()[-1] == "interrupted"
