"""The run folder as one named contract, and one typed schema for each JSON file a run or `tinybert bench` writes
(metrics.json, bench.json), written and read by the same code. Without torch: report.py and publish.py read run
folders without the training stack that train.py, general.py and task.py bring in to write them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

RECIPE, LOG, TENSORBOARD, CHECKPOINTS = "recipe.yaml", "log.jsonl", "tensorboard", "checkpoints"
MANIFEST = "manifest.json"  # in every checkpoint: each file's size and sha256, written last (see write_manifest)
CHECKPOINT_NAME = re.compile(r"step-\d+")
STUDENT, BEST, LAST, METRICS, BENCH = "student", "best", "last", "metrics.json", "bench.json"
REPORT = "report"  # `tinybert report`'s plots and report.md, unless --out says elsewhere
STAGE1, STAGE2 = "stage1", "stage2"
# What a run of each kind writes into its folder: a folder holding any of these holds a run of that kind, and
# --overwrite removes these and nothing else.
WRITES = {
    "general": (CHECKPOINTS, LOG, TENSORBOARD, STUDENT, RECIPE),
    "finetune": (CHECKPOINTS, LOG, TENSORBOARD, BEST, LAST, METRICS, RECIPE),
    "task": (STAGE1, STAGE2, BEST, LAST, METRICS, RECIPE),
}


@dataclass(frozen=True)
class RunDir:
    """A run's --output folder (WRITES lists what each kind of run writes there).

    general distillation:  recipe.yaml  log.jsonl  tensorboard/  checkpoints/step-NNNNNNN/  student/
    fine-tuning:           recipe.yaml  log.jsonl  tensorboard/  checkpoints/step-NNNNNNN/  best/  last/  metrics.json
    task distillation:     recipe.yaml  stage1/{log.jsonl, tensorboard, checkpoints, student/}
                           stage2/{log.jsonl, tensorboard, checkpoints}  best/  last/  metrics.json
    best/ and last/ are Hugging Face directories (best by the task's main metric, last at the end); stage1/student
    is the student that enters stage 2. The folder of one stage is a RunDir of its own (`run_dir.stage("stage1")`).
    """

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def stage(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    recipe = property(lambda self: self.path / RECIPE)
    log = property(lambda self: self.path / LOG)
    tensorboard = property(lambda self: self.path / TENSORBOARD)
    student = property(lambda self: self.path / STUDENT)
    best = property(lambda self: self.path / BEST)
    last = property(lambda self: self.path / LAST)
    metrics = property(lambda self: self.path / METRICS)
    report = property(lambda self: self.path / REPORT)

    def checkpoint(self, step: int, *, tmp: bool = False) -> Path:
        """checkpoints/step-NNNNNNN, or the `.tmp-` directory it is written into before the rename."""
        return self.path / CHECKPOINTS / f"{'.tmp-' if tmp else ''}step-{step:07d}"

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders (step-NNNNNNN), oldest first; see odd_checkpoints and unfinished_checkpoints for the
        rest. Whether one is complete and unchanged is its manifest's say (manifest_problem)."""
        return sorted((p for p in self._checkpoint_folders() if CHECKPOINT_NAME.fullmatch(p.name)),
                      key=lambda p: int(p.name.split("-")[1]))

    def odd_checkpoints(self) -> list[Path]:
        """Entries under checkpoints/ that are neither a checkpoint nor an unfinished write (e.g. `step-abc`)."""
        return sorted(p for p in self._checkpoint_folders()
                      if not CHECKPOINT_NAME.fullmatch(p.name) and not p.name.startswith(".tmp-step-"))

    def unfinished_checkpoints(self) -> list[Path]:
        """`.tmp-step-*` folders: checkpoint writes a killed run never renamed into place."""
        return sorted(p for p in self._checkpoint_folders() if p.name.startswith(".tmp-step-"))

    def _checkpoint_folders(self) -> list[Path]:
        folder = self.path / CHECKPOINTS
        return list(folder.iterdir()) if folder.is_dir() else []

    def latest_checkpoint(self) -> Path | None:
        return next(reversed(self.checkpoints()), None)

    def logs(self) -> list[Path]:
        """The run's log files: its own log.jsonl, and those of its stages (stage1/, stage2/)."""
        return [log for log in [self.log] + sorted(self.path.glob(f"*/{LOG}")) if log.is_file()]

    def holds(self, kind: str) -> bool:
        """Whether the folder holds any file that a run of `kind` writes."""
        return self.path.is_dir() and any((self.path / name).exists() for name in WRITES[kind])


def is_finite_number(value) -> bool:
    """A JSON number that can be shown as a figure: int or float, not bool, not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_atomic(path: Path, text: str):
    """Write a whole file through a temporary file beside it and os.replace: a reader (or a run killed mid-write)
    sees the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _JsonFile:
    """A dataclass written as one JSON file (atomically)."""

    def write(self, path: Path):
        write_atomic(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def read_log(path: Path) -> tuple[list[dict], bool]:
    """log.jsonl's records, and whether its last line was torn (half a line from a run killed while appending it;
    skipped). Any other line that is not JSON is a ValueError naming it."""
    records, lines = [], path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                return records, True
            raise ValueError(f"{path} line {number} is not JSON; is this a log.jsonl written by tinybert?") from None
        if isinstance(record, dict):
            records.append(record)
    return records, False


# ------------------------------------------------------------------------------------------------------ manifests


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` but its manifest, by its path relative to `folder` (posix)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}


def write_manifest(folder: Path):
    """manifest.json: the size and sha256 of every file in a checkpoint folder, written once all of them are (and
    before the folder is renamed into place), so --resume can tell a complete, unchanged checkpoint from a damaged
    one before anything reads it."""
    files = {name: {"size": p.stat().st_size, "sha256": _sha256(p)} for name, p in _files(folder).items()}
    write_atomic(folder / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def manifest_problem(folder: Path) -> str | None:
    """None when the checkpoint `folder` holds exactly the files its manifest lists, each with its size and
    sha256; else what is wrong, in a few words (the first problem found)."""
    try:
        listed = json.loads((folder / MANIFEST).read_text()).get("files")
    except FileNotFoundError:
        return f"no {MANIFEST}: its write never finished, or an older tinybert wrote it"
    except (OSError, ValueError, AttributeError):  # ValueError: not JSON, or not UTF-8
        listed = None
    if not isinstance(listed, dict) or not all(isinstance(v, dict) for v in listed.values()):
        return f"its {MANIFEST} is unreadable"
    found = _files(folder)
    for name in sorted(set(listed) | set(found)):
        if name not in found:
            return f"{name} is missing"
        if name not in listed:
            return f"{name} is not in its {MANIFEST}"
        size = found[name].stat().st_size
        if size != listed[name].get("size"):
            return f"{name} has {size} bytes, its {MANIFEST} says {listed[name].get('size')}"
        if _sha256(found[name]) != listed[name].get("sha256"):
            return f"{name} differs from its {MANIFEST} (sha256)"
    return None


# ---------------------------------------------------------------------------------------------------- metrics.json


@dataclass
class Metrics(_JsonFile):
    """metrics.json of a fine-tuning or task-distillation run. An evaluation is {"stage", "step", metric: value...};
    metrics of a second dev split are keyed "split/metric" (MNLI's mismatched). best: the evaluation whose model is
    in best/; last: the one of last/ (None when the run never evaluated); history: every evaluation, in order."""

    task: str
    main_metric: str
    best: dict | None
    last: dict | None
    history: list[dict]

    @classmethod
    def read(cls, path: str | os.PathLike) -> Metrics:
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, dict) or set(fields) - set(raw):
            raise ValueError(f"metrics file {path} is not a run's metrics.json (it holds {', '.join(fields)})")
        return cls(**{name: raw[name] for name in fields})


# ------------------------------------------------------------------------------------------------------ bench.json


@dataclass
class BenchSide:
    """One model's figures from `tinybert bench`, at sequence length seq_len: latency at batch 1, throughput at
    throughput_batch; engine: torch or onnxruntime. Figures a hand-written bench file leaves out are None."""

    model: str | None = None
    engine: str | None = None
    device: str | None = None
    dtype: str | None = None
    seq_len: int | None = None
    parameters: int | None = None
    size_on_disk_bytes: int | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    throughput_batch: int | None = None
    throughput_seq_per_s: float | None = None
    threads: int | None = None


# Other names hand-written bench files use for BenchSide's fields.
BENCH_ALIASES = {"name": "model", "precision": "dtype", "params": "parameters", "num_parameters": "parameters",
                 "p50_ms": "latency_ms_p50", "latency_p50_ms": "latency_ms_p50", "p50": "latency_ms_p50",
                 "p95_ms": "latency_ms_p95", "latency_p95_ms": "latency_ms_p95", "p95": "latency_ms_p95",
                 "throughput": "throughput_seq_per_s", "sequences_per_s": "throughput_seq_per_s"}
SPEEDUP_ALIASES = {"latency": "latency_speedup", "throughput": "throughput_speedup"}


@dataclass
class Bench(_JsonFile):
    """bench.json: `tinybert bench MODEL --vs OTHER` (speedup: latency_speedup, throughput_speedup, size_ratio of
    MODEL over OTHER, > 1 = MODEL is faster or smaller; machine: cpu, gpu, torch, date). `tinybert bench EXPORT
    --engine onnxruntime`: model is the ONNX fp32 graph, vs the PyTorch model it came from, int8 the quantised graph
    and int8_speedup int8 over fp32 (machine adds the onnxruntime version)."""

    model: BenchSide
    vs: BenchSide | None = None
    speedup: dict[str, float] | None = None
    machine: dict | None = None
    int8: BenchSide | None = None
    int8_speedup: dict[str, float] | None = None

    @classmethod
    def read(cls, source) -> Bench:
        """A bench.json path, or its dict. Also takes the shorter forms people write by hand (the one place they
        are known): BENCH_ALIASES' names on the sides, conditions (device, dtype...) at the top instead of on the
        model's side, and "speedup" as one number (the latency speed-up)."""
        raw = source
        if isinstance(source, (str, os.PathLike)):
            try:
                raw = json.loads(Path(source).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"bench file {source}: {type(e).__name__}: {e}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise ValueError("a bench result must be a mapping with 'model' (and 'vs'), as `tinybert bench` writes")
        top = {k: v for k, v in raw.items() if k not in {f.name for f in dataclasses.fields(cls)}}
        speedup = raw.get("speedup")
        if is_finite_number(speedup):
            speedup = {"latency_speedup": speedup}
        side = lambda key: _side(raw[key]) if isinstance(raw.get(key), dict) else None  # noqa: E731
        ratios = lambda d: _fields(d, SPEEDUP_ALIASES) if isinstance(d, dict) else None  # noqa: E731
        return cls(model=_side({**top, **raw["model"]}), vs=side("vs"), speedup=ratios(speedup),
                   machine=raw.get("machine") if isinstance(raw.get("machine"), dict) else None,
                   int8=side("int8"), int8_speedup=ratios(raw.get("int8_speedup")))


def _fields(raw: dict, aliases: dict, texts: tuple[str, ...] = ()) -> dict:
    """raw with aliases renamed (the field's own name wins over an alias); the `texts` fields take strings, the
    others figures, and a value of the wrong kind (or NaN, infinity) is left out as if absent."""
    out = {}
    for key, value in sorted(raw.items(), key=lambda item: item[0] in aliases):
        key = aliases.get(key, key)
        if key not in out and (isinstance(value, str) if key in texts else is_finite_number(value)):
            out[key] = value
    return out


def _side(raw: dict) -> BenchSide:
    fields = _fields(raw, BENCH_ALIASES, texts=("model", "engine", "device", "dtype"))
    return BenchSide(**{k: v for k, v in fields.items() if k in BenchSide.__dataclass_fields__})
