"""Running the CLI as a user does, in subprocesses: one process or several under `torch.distributed.run`
(torchrun), reading what a run writes while it runs, and killing it mid-run; and `cli`, the same command in this
process (faster, for runs that are refused or short)."""

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TINYBERT_TRACEBACK", None)
    return env


def _command(args, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "tinybert.cli", *map(str, args)]
    # --standalone picks a free rendezvous port: other torchrun jobs on this machine do not collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "tinybert.cli", *map(str, args)]


def tinybert(*args, nproc: int = 1, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(_command(args, nproc), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def cli(*args) -> tuple[int, str, str]:
    """Run `tinybert ARGS` in this process: (exit code, stdout, stderr)."""
    from tinybert.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def records(output: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def logged_steps(output: Path) -> list[int]:
    """Train steps in a log that a running process is writing (a line being written is skipped)."""
    steps = []
    if (output / "log.jsonl").exists():
        for line in (output / "log.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "train":
                steps.append(record["step"])
    return steps


def checkpoint_steps(output: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (output / "checkpoints").glob("step-*"))


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children, then theirs)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def kill_run(proc: subprocess.Popen, timeout: float = 60):
    """SIGKILL a run and every process it started, and wait until all are dead. torchrun starts each rank in a
    session of its own, so killing the launcher's process group alone would leave the ranks running as orphans
    (they would finish the run while the test resumes it)."""
    ranks = _descendants(proc.pid)
    for pid in [proc.pid, *ranks]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while not all(_gone(pid) for pid in ranks):  # orphans: init reaps them, not us
        assert time.monotonic() < deadline, f"processes {ranks} still alive after SIGKILL"
        time.sleep(0.05)


def kill_after_first_checkpoint(args, output: Path, steps: int, *, nproc: int = 1, timeout: float = 900,
                                stage: str = "") -> int:
    """Start the run, wait for its first checkpoint, pick a later step at random, SIGKILL the whole process group
    once that step is logged (mid-step, or mid-checkpoint-write when the step saves). Returns the step picked.
    stage: the subdirectory of `output` that holds the checkpoints and log to watch (task distillation's "stage2");
    `steps` are that stage's."""
    # stderr to a file: progress bars would fill a pipe nobody reads and block the run.
    stderr = (output.parent / f"{output.name}-killed.stderr").open("w+")
    output = output / stage
    proc = subprocess.Popen(_command(args, nproc), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True, start_new_session=True)
    deadline, target = time.monotonic() + timeout, None
    try:
        while True:
            if proc.poll() is not None:
                stderr.seek(0)
                pytest.fail(f"the run ended (exit {proc.returncode}) before it was killed: {stderr.read()[-4000:]}")
            assert time.monotonic() < deadline, "timed out waiting for the run"
            if target is None and (output / "checkpoints").is_dir() and checkpoint_steps(output):
                first = checkpoint_steps(output)[0]
                target = random.randint(first + 1, steps - 2)
            if target is not None and (logged := logged_steps(output)) and logged[-1] >= target:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            kill_run(proc)
        proc.wait()
        stderr.close()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return target
