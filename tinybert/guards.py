"""Guards every run passes before it writes anything: where its --output may be (never in or around an input), one
run at a time per --output (a lock file), a fingerprint of what makes the result (so that --resume continues the
same run or refuses), and settings that cannot work refused before any model is loaded.

Each refusal is one line (a GuardError, a ValueError, which the CLI prints as `error: ...`)."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import time
from pathlib import Path

LOCK, FINGERPRINT = ".tinybert.lock", "fingerprint.json"
# Recipe keys that only extend a run (more steps or epochs) or observe it (how often it logs, evaluates, saves, and
# how many checkpoints it keeps): --resume may change them. epochs may only grow. Every other key changes the result.
EXTENDS = ("max_steps", "epochs", "save_every", "eval_every", "log_every", "keep_checkpoints")
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")


class GuardError(ValueError):
    """A run refused before it started; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- --output's place


def check_output_place(output: Path, inputs: dict[str, object]):
    """--output may not be, contain, or lie inside any input on disk (inputs: label -> path, or a list of paths;
    presets, hub ids and None are skipped), nor be a file or lie under one."""
    out = Path(output).resolve()
    for label, paths in inputs.items():
        for path in paths if isinstance(paths, (list, tuple)) else [paths]:
            if path is None or not Path(path).exists():
                continue
            src = Path(path).resolve()
            relation = ("is" if out == src else "lies inside" if src in out.parents else
                        "contains" if out in src.parents else None)
            if relation:
                raise GuardError(f"--output {output} {relation} the {label} {path}; a run writes checkpoints and logs "
                                 f"there: choose an --output folder of its own, outside every input")
    blocker = next((p for p in [out, *out.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == out else f"lies under the file {blocker}"
        raise GuardError(f"--output {output} {where}; give a folder path for the run")


# ---------------------------------------------------------------------------------------------------- the lock


_held: set[Path] = set()  # lock files this process holds, released at exit (and by cli.main when a command ends)


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process. A killed process whose parent has not reaped it yet (a zombie: a torchrun
    rank after SIGKILL of the launcher) still answers kill(pid, 0), so /proc's state is read where there is one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _read_lock(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None  # a lock torn by a kill while it was written: nobody holds it


def take_lock(output: Path, echo=print) -> Path:
    """Create `output` if needed and hold OUTPUT/.tinybert.lock (pid, host, start time) until the process ends or
    `release_locks()`. A lock held by a live process (or one on another host) refuses the run; a stale one (its
    process is gone from this host) is taken over, and said so. Unwritable folders are refused in one line."""
    path = Path(output) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        Path(output).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        owner = _read_lock(path)
        if owner is not None and owner["pid"] != os.getpid() and (owner.get("host") != me["host"]
                                                                  or _alive(owner["pid"])):
            raise GuardError(f"--output {output} is in use by another run (pid {owner['pid']} on "
                             f"{owner.get('host')}, started {owner.get('started')}); wait for it to end, or choose "
                             f"another --output (delete {path} only if that run is gone)") from None
        if owner is not None and owner["pid"] != os.getpid():
            echo(f"taking over the stale lock {path} of pid {owner['pid']} (started {owner.get('started')}), "
                 f"which is no longer running")
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    except OSError as e:
        raise GuardError(f"--output {output}: cannot create or write the folder ({e.strerror}); choose a folder "
                         f"you can write to") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me) + "\n")
    _held.add(path)
    return path


def release_locks():
    """Remove the lock files this process holds (those another process has since taken over stay)."""
    for path in list(_held):
        owner = _read_lock(path)
        if owner is not None and owner["pid"] == os.getpid():
            path.unlink(missing_ok=True)
        _held.discard(path)


atexit.register(release_locks)


# ---------------------------------------------------------------------------------------------- the fingerprint


def _sha256(paths: list[Path]) -> str:
    """One hash over files' names and bytes, in the order given."""
    from tinybert.data import file_sha256

    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()[:16]


def model_identity(source) -> str | None:
    """A model directory by the hash of its config, weights and tokenizer files; a preset or hub id by its name."""
    if source is None or not Path(source).is_dir():
        return None if source is None else str(source)
    files = [Path(source) / name for name in MODEL_FILES if (Path(source) / name).is_file()]
    return f"sha256 {_sha256(files)} ({sum(p.stat().st_size for p in files):,} bytes)"


def data_identity(source) -> str | None:
    """A file or folder (every file under it) by its bytes' hash; anything else (a hub dataset id) by its name."""
    if source is None:
        return None
    if isinstance(source, (list, tuple)):
        return "; ".join(str(data_identity(s)) for s in source) if source else None
    path = Path(source)
    if path.is_file():
        return f"sha256 {_sha256([path])}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return f"sha256 {_sha256(files)} ({len(files)} files)"
    return str(source)


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def run_fingerprint(recipe: dict, *, models: dict, data: dict) -> dict:
    """What makes a run's result: every recipe key (flattened: `terms.attention`, `stage1.learning_rate`), each
    model's identity and each data source's. models, data: label -> source (see model_identity, data_identity)."""
    return {**_flatten(json.loads(json.dumps(recipe, default=str))),
            **{label: model_identity(source) for label, source in models.items()},
            **{label: data_identity(source) for label, source in data.items()}}


def _extends(key: str, old, new) -> bool:
    name = key.rpartition(".")[2]
    if name == "epochs":
        return old is not None and new is not None and new >= old
    return name in EXTENDS


def compare_fingerprint(run_dir, fingerprint: dict, echo=print):
    """--resume: refuse when anything but EXTENDS changed since the run's fingerprint.json (naming each key, old ->
    new); say which extending keys changed. A run from before fingerprints were written is not checked."""
    path = Path(run_dir.path) / FINGERPRINT
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        echo(f"--resume: {path} is missing or unreadable; the run's settings cannot be compared")
        return
    changed = {k: (old.get(k), fingerprint.get(k)) for k in sorted(old.keys() | fingerprint.keys())
               if old.get(k) != fingerprint.get(k)}
    refused = {k: v for k, v in changed.items() if not _extends(k, *v)}
    show = lambda items: ", ".join(f"{k} {a} -> {b}" for k, (a, b) in items.items())  # noqa: E731
    if refused:
        raise GuardError(f"--resume: this run was started with other settings ({show(refused)}); resume it with "
                         f"the ones it had, or start a new run (another --output, or --overwrite)")
    if changed:
        echo(f"--resume: extending the run ({show(changed)})")


def write_fingerprint(run_dir, fingerprint: dict):
    path = Path(run_dir.path) / FINGERPRINT
    tmp = path.with_name(f".tmp-{FINGERPRINT}")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- settings up front


def check_schedule(recipe, stage: str = ""):
    """A stage that would train for nothing: epochs 0 and no max_steps (the run would exit having done nothing)."""
    if not recipe.max_steps and recipe.epochs == 0:
        where = f"{stage}." if stage else ""
        raise GuardError(f"recipe key {where}epochs is 0 and {where}max_steps is 0: the run would train for no "
                         f"step; give epochs > 0 or max_steps > 0")


def check_model_configs(models: dict):
    """Read each model folder's config.json before any weights load: values that cannot work (vocab_size 0, no
    heads, heads that do not divide the width, no layers) are refused in one line naming the file."""
    from tinybert.checkpoint import read_config

    for source in models.values():
        if source is not None and Path(source).is_dir():
            read_config(source)


def check_same_vocabulary(student, teacher_tokenizer):
    """A student folder with a tokenizer of its own must give every token the teacher's id (the same size is not
    enough: the embeddings of a permuted vocabulary belong to other tokens); compared id by id."""
    from tinybert.checkpoint import CheckpointError, load_tokenizer

    path = Path(student) if student is not None else None
    if path is None or not path.is_dir() or not any((path / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        return
    by_id = lambda tokenizer: {i: t for t, i in tokenizer.get_vocab().items()}  # noqa: E731
    teacher, mine = by_id(teacher_tokenizer), by_id(load_tokenizer(path))
    first = next((i for i in sorted(teacher.keys() | mine.keys()) if teacher.get(i) != mine.get(i)), None)
    if first is not None:
        raise CheckpointError(f"student {student} has another vocabulary than the teacher: id {first} is "
                              f"{teacher.get(first)!r} in the teacher's tokenizer and {mine.get(first)!r} in the "
                              f"student's; distillation needs the teacher's tokenizer for both (tinybert init "
                              f"--tokenizer TEACHER)")
