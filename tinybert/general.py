"""General distillation (TinyBERT section 3.2, first stage): a teacher into a student on raw text with the
embedding, hidden-state and attention losses, or MiniLM's relation losses, on the shared loop of train.py."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch
import yaml

from tinybert.checkpoint import CheckpointError, load_model, load_tokenizer, read_projections
from tinybert.corpus import build_corpus, collate_packed, corpus_stats
from tinybert.distill import Distiller
from tinybert.guards import check_model_configs, check_same_vocabulary, check_schedule, run_fingerprint
from tinybert.model import PRESETS, Bert, BertConfig
from tinybert.recipe import Recipe
from tinybert.rundir import RunDir
from tinybert.task import export
from tinybert.train import (
    Stage,
    TrainingError,
    average_terms,
    check_output,
    decide_precision,
    micro_batch_size,
    run_stage,
    start_output,
    start_run,
    teacher_dtype,
    total_steps,
)


def build_student(student: str | None, teacher: Bert) -> Bert:
    """A preset (random init, the teacher's vocabulary) or a model directory; default tinybert-4l-312d."""
    student = student or "tinybert-4l-312d"
    if student in PRESETS and not Path(student).exists():
        tc = teacher.config
        return Bert(BertConfig.preset(student, vocab_size=tc.vocab_size, pad_token_id=tc.pad_token_id,
                                      max_position_embeddings=tc.max_position_embeddings,
                                      type_vocab_size=tc.type_vocab_size))
    model = load_model(student)
    if model.config.vocab_size != teacher.config.vocab_size:
        raise CheckpointError(f"student {student} has a vocabulary of {model.config.vocab_size} tokens but the "
                              f"teacher has {teacher.config.vocab_size}; distillation needs the same tokenizer for "
                              f"both")
    return model


def carry_projections(distiller: Distiller, student: str | None, say) -> None:
    """A student from the original TinyBERT's general distillation brings its learned fit_dense(s): the
    distiller's projections start from them (see Projections.start_from), and the run says so."""
    done = distiller.projections.start_from(read_projections(student)) if student else None
    if done:
        say(f"student {student}: {done}")


def describe(recipe: Recipe, teacher: Bert, student: Bert, distiller: Distiller, stats: dict, steps: int) -> str:
    """The --dry-run report: recipe, both shapes, the layer map, the corpus and the schedule."""
    lines = ["recipe:", "  " + yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip().replace("\n", "\n  ")]
    for name, model in (("teacher", teacher), ("student", student)):
        c, n = model.config, model.num_parameters()
        lines.append(f"{name}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, FFN {c.intermediate_size}, "
                     f"{c.num_attention_heads} heads; {n['total'] / 1e6:.1f}M parameters "
                     f"({n['embeddings'] / 1e6:.1f}M embeddings, {n['encoder'] / 1e6:.1f}M encoder)")
    if distiller.layer_map is None:
        lines.append("layer map: not used (no embedding, hidden or attention term)")
    else:
        lines += ["layer map (state 0 = embeddings):",
                  f"  {'student':>8} <- {'teacher':<8} {'projection':<14} attention scores"]
        sh, th = student.config.hidden_size, teacher.config.hidden_size
        proj = "identity" if sh == th else f"{sh} -> {th}" + (" (shared)" if recipe.shared_projection else "")
        attention = "attention" in distiller.terms
        for j, t in enumerate(distiller.layer_map):
            scores = f"layer {j} <- layer {t}" if attention and j > 0 else "-"
            lines.append(f"  {j:>8} <- {t:<8} {proj:<14} {scores}")
    lines += distiller.describe_relations()
    n_proj = sum(p.numel() for p in distiller.projections.parameters())
    lines.append(f"projections: {n_proj:,} parameters (trained with the student, never exported)")
    for split, s in stats.items():
        lines.append(f"corpus {split}: {s['rows']:,} sequences, {s['tokens']:,} tokens, {s['documents']} documents")
    lines.append(f"schedule: {steps:,} optimizer steps of {recipe.batch_size} sequences "
                 f"({recipe.grad_accum} micro-batches each), warmup {int(recipe.warmup_ratio * steps)} steps")
    return "\n".join(lines)


def run_general(recipe: Recipe, *, teacher: str, corpus: list[str], output: Path, student: str | None = None,
                resume: bool = False, overwrite: bool = False, dry_run: bool = False, progress: bool = True,
                echo=print) -> Path | None:
    """Distil `teacher` into `student` on `corpus`; returns the exported student directory (None on a dry run)."""
    run_dir = RunDir(output)
    models = {"teacher": teacher, "student": student}
    check_schedule(recipe)
    check_model_configs(models)
    fingerprint = None
    if not dry_run:
        fingerprint = run_fingerprint(recipe.to_dict(), models=models, data={"corpus": corpus})
        check_output(run_dir, "general", resume=resume, overwrite=overwrite, needs_checkpoint=True,
                     inputs={**models, "corpus": corpus}, fingerprint=fingerprint, echo=echo)
    run = start_run(recipe, dry_run=dry_run)
    say = run.say(echo)
    teacher_model = load_model(teacher)
    verdict = decide_precision(recipe.precision, run.device, teacher_model.config, say)
    recipe = dataclasses.replace(recipe, precision=verdict.precision)
    tokenizer = load_tokenizer(teacher, vocab_size=teacher_model.config.vocab_size)
    student_model = build_student(student, teacher_model)
    check_same_vocabulary(student, tokenizer)
    terms = {name: weight for name, weight in recipe.terms.items() if name != "prediction"}
    if not terms:
        raise TrainingError("general distillation needs at least one loss term besides prediction (embedding, "
                            "hidden, attention, or a relation term)")
    distiller = Distiller(teacher_model, student_model, recipe.layer_map, terms=tuple(terms),
                          attention_mode=recipe.attention_mode, shared_projection=recipe.shared_projection,
                          relation_heads=recipe.relation_heads, teacher_layer=recipe.teacher_layer)
    carry_projections(distiller, student, say)
    data = build_corpus(corpus, tokenizer, max_seq_length=recipe.max_seq_length,
                        heldout_fraction=recipe.heldout_fraction, seed=recipe.seed)
    micro = micro_batch_size(recipe)

    def plan(epoch: int) -> list[list[int]]:
        order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(recipe.seed + epoch))
        return [order[i:i + micro].tolist() for i in range(0, len(order) - micro + 1, micro)]

    pad, heldout = partial(collate_packed, pad_token_id=tokenizer.pad_token_id), data["heldout"]
    evaluate = lambda m: average_terms(m, heldout, micro, pad, run.device, recipe.precision, terms)  # noqa: E731
    stage = Stage("general", distiller, terms, data["train"], plan, pad, evaluate if len(heldout) else None)
    steps = total_steps(stage, recipe)
    if dry_run:
        echo(describe(recipe, teacher_model, student_model, distiller, corpus_stats(data), steps))
        return None

    record = {**recipe.to_dict(), "teacher": str(teacher), "student": student, "corpus": [str(c) for c in corpus],
              "precision_decision": verdict.to_dict()}
    teacher_model.to(run.device, teacher_dtype(recipe.precision))
    engine = run_stage(stage, recipe, run_dir, steps, run.device, resume=resume, progress=progress, echo=say,
                       on_start=lambda: start_output(run_dir, "general", record, fingerprint,
                                                     clear=overwrite and not resume))
    if not run.main:
        return None
    export(engine.module.student, run_dir.student, tokenizer)
    echo(f"student written to {run_dir.student}")
    return run_dir.student
