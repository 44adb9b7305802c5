"""General distillation end to end, as a user runs it: `tinybert distill --recipe general` in a subprocess with the
real MiniLM teacher on real books. Loss terms fall, the student exports to plain transformers, a run killed with
SIGKILL resumes to the very same weights, DeepSpeed (ZeRO-1/2, 1 and 2 processes) resumes too, gradient
accumulation is the big batch, bad input is one `error:` line that leaves earlier checkpoints alone, and --dry-run
shows the plan and writes nothing.

Runs are small (batch 8, 64 tokens, one short book) but real: every run loads the 6-layer teacher and the corpus.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinybert.checkpoint import load_model, load_tokenizer, save_model
from tinybert.model import Bert, BertConfig

from launch import checkpoint_steps, kill_after_first_checkpoint, ok, records, tinybert  # tests/launch.py

TERMS = ("embedding", "hidden", "attention")
V2 = ("q_relation", "k_relation", "v_relation")  # recipes/general-minilmv2.yaml
SMALL = ["batch_size=8", "max_seq_length=64"]
CAROL = "pg46_a_christmas_carol.txt"  # ~40k tokens: ~600 rows of 64
ALICE = "pg11_alices_adventures_in_wonderland.txt"


# ---------------------------------------------------------------------------------------------------- helpers


def distill(teacher, corpus, output, *extra, nproc: int = 1, timeout: float = 1200) -> subprocess.CompletedProcess:
    corpora = [a for c in ([corpus] if isinstance(corpus, (str, Path)) else corpus) for a in ("--corpus", c)]
    return tinybert("distill", "--recipe", "general", "--teacher", teacher, *corpora, "--output", output, *extra,
                    nproc=nproc, timeout=timeout)


def snapshot(directory: Path) -> dict:
    """Every file and folder under `directory` with its bytes' hash (folders as "dir")."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def assert_log_has_each_step_once(output: Path, steps: int):
    train = [r["step"] for r in records(output, "train")]
    assert train == list(range(1, steps + 1)), train
    evals = [r["step"] for r in records(output, "eval")]
    assert evals == sorted(set(evals)), evals


def save_student(directory: Path, teacher_dir: Path, seed: int = 0, **config) -> Path:
    """A randomly initialised student with the teacher's tokenizer (vocab_size defaults to the teacher's)."""
    tokenizer = load_tokenizer(teacher_dir)
    torch.manual_seed(seed)
    save_model(Bert(BertConfig(**{"vocab_size": len(tokenizer), **config})), directory, tokenizer)
    return directory


@pytest.fixture(scope="module")
def books(data_dir) -> Path:
    folder = data_dir / "corpus" / "gutenberg"
    if not (folder / CAROL).is_file():
        pytest.skip(f"{folder / CAROL} not found")
    return folder


# ---------------------------------------------------------------------------------------------------- real runs

# A random 3-layer student as wide as MiniLM (uniform map 0,2,4,6; identity projections: no parameters), and the
# tinybert-4l-312d preset with an explicit map (learned 312 -> 384 projections, one per state).
STUDENTS = {
    "3l-384-uniform": (ALICE, ["precision=fp32"], 0),
    "4l-312d-explicit": (CAROL, ["--student", "tinybert-4l-312d", "layer_map=[0,2,3,5,6]"], 5),
}
REAL_STEPS = 200


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDENTS)
def test_every_loss_term_falls_and_the_student_loads_in_transformers(name, minilm_dir, books, tmp_path):
    book, extra, projections = STUDENTS[name]
    if name.startswith("3l"):
        student = save_student(tmp_path / "student-init", minilm_dir, hidden_size=384, num_hidden_layers=3,
                               num_attention_heads=12, intermediate_size=1536)
        extra = ["--student", student, *extra]
    output = tmp_path / "run"
    result = ok(distill(minilm_dir, books / book, output, *SMALL, *extra, f"max_steps={REAL_STEPS}",
                        "learning_rate=5e-4", "eval_every=50", "save_every=100"))
    assert f"student written to {output / 'student'}" in result.stdout

    train = records(output, "train")
    assert [r["step"] for r in train] == list(range(1, REAL_STEPS + 1))
    for term in TERMS:
        first = sum(r[term] for r in train[:10]) / 10
        last = sum(r[term] for r in train[-10:]) / 10
        assert last < 0.9 * first, f"{term}: mean of the first 10 steps {first:.4g}, of the last 10 {last:.4g}"
    evals = records(output, "eval")
    assert [r["step"] for r in evals] == [50, 100, 150, 200]
    for term in TERMS + ("loss",):
        assert evals[-1][term] < evals[0][term], f"held-out {term}: {[round(r[term], 4) for r in evals]}"

    # The projections are the distillation's: 0 parameters when the widths match, one Linear per state otherwise.
    state = torch.load(output / "checkpoints" / f"step-{REAL_STEPS:07d}" / "rank0" / "state.pt", weights_only=True)
    fit = sorted({k.split(".")[2] for k in state["module"] if k.startswith("projections.fit_denses.")}, key=int)
    assert len(fit) == projections
    exported = load_file(output / "student" / "model.safetensors")
    assert not any("fit_dense" in k or "projection" in k for k in exported)
    assert checkpoint_steps(output) == [100, 200]

    assert_loads_in_transformers(output / "student")


def assert_loads_in_transformers(student: Path):
    """The exported student: plain transformers, offline, and the same numbers as our model."""
    from transformers import AutoModel, AutoTokenizer

    hf, info = AutoModel.from_pretrained(str(student), local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = load_model(student)
    assert (hf.config.num_hidden_layers, hf.config.hidden_size, hf.config.num_attention_heads) == (
        ours.config.num_hidden_layers, ours.config.hidden_size, ours.config.num_attention_heads)
    tokenizer = AutoTokenizer.from_pretrained(str(student), local_files_only=True)
    batch = tokenizer(["Marley was dead: to begin with.", "Alice was beginning to get very tired."],
                      padding=True, return_tensors="pt")
    hf.eval(), ours.eval()
    with torch.no_grad():
        expected = hf(**batch).last_hidden_state
        got = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).hidden_states[-1]
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- exact resume

RESUME_STEPS = 10


# bf16 runs at half the fp32 speed on CPUs without AMX: ~1 min on a quiet 2-core machine, 3 under load.
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_a_killed_run_resumes_to_the_same_weights_bit_for_bit(precision, minilm_dir, books, tmp_path):
    """Plain engine on CPU, dropout on (so the RNG states must come back too): run A straight through, run B killed
    with SIGKILL at a random step after its first checkpoint, then the same command with --resume."""
    args = [*SMALL, f"max_steps={RESUME_STEPS}", "save_every=3", "eval_every=4", "log_every=1",
            f"precision={precision}", "layer_map=[0,2,3,5,6]", "learning_rate=2e-4"]
    a, b = tmp_path / "a", tmp_path / "b"
    ok(distill(minilm_dir, books / CAROL, a, *args))

    command = ["distill", "--recipe", "general", "--teacher", minilm_dir, "--corpus", books / CAROL,
               "--output", b, *args]
    killed_at = kill_after_first_checkpoint(command, b, RESUME_STEPS)
    assert not (b / "student").exists()
    resumed = ok(tinybert(*command, "--resume"))
    assert "resuming from" in resumed.stdout

    a_bytes = (a / "student" / "model.safetensors").read_bytes()
    b_bytes = (b / "student" / "model.safetensors").read_bytes()
    if a_bytes != b_bytes:
        wa, wb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        pytest.fail(f"killed after step {killed_at}: {len(differ)} tensors differ, e.g. {differ[:5]}")
    assert_log_has_each_step_once(b, RESUME_STEPS)
    # The loss terms logged after the resume are the uninterrupted run's, step by step.
    for ra, rb in zip(records(a, "train"), records(b, "train")):
        assert {k: ra[k] for k in TERMS} == {k: rb[k] for k in TERMS}, (killed_at, ra["step"])
    assert [r["loss"] for r in records(a, "eval")] == [r["loss"] for r in records(b, "eval")]
    assert not list((b / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------------- DeepSpeed

DS_STEPS = 6


@pytest.mark.slow
@pytest.mark.parametrize("zero, nproc, recipe", [(1, 1, "general"), (2, 2, "general"), (2, 1, "general"),
                                                 (1, 2, "general"), (2, 1, "general-minilmv2")])
def test_deepspeed_bf16_resumes_after_a_kill(zero, nproc, recipe, minilm_dir, books, tmp_path):
    """ZeRO stage `zero`, bf16, `nproc` processes on CPU (gloo): a run killed after its first checkpoint and resumed
    ends where an uninterrupted run ends. MiniLMv2's terms leave the student's last feed-forward without gradients:
    the same machinery holds."""
    pytest.importorskip("deepspeed")
    args = ["batch_size=8", "max_seq_length=32", f"max_steps={DS_STEPS}", "save_every=2", "log_every=1",
            "heldout_fraction=0", "precision=bf16", "layer_map=[0,2,3,5,6]", "learning_rate=2e-4",
            "deepspeed=zero2-bf16.json", f"deepspeed.zero_optimization.stage={zero}"]
    terms = TERMS if recipe == "general" else V2
    a, b = tmp_path / "a", tmp_path / "b"
    command = lambda output: ["distill", "--recipe", recipe, "--teacher", minilm_dir, "--corpus", books / CAROL,
                              "--output", output, *args]
    ok(tinybert(*command(a), nproc=nproc))
    # DeepSpeed's own layout, one optimizer shard per process ("bf16_zero_pp_rank_0_..." under its BF16_Optimizer).
    shards = [p.name for p in (a / "checkpoints" / f"step-{DS_STEPS:07d}" / "deepspeed").glob("*zero_pp_rank_*")]
    assert sorted(int(re.search(r"zero_pp_rank_(\d+)_", name)[1]) for name in shards) == list(range(nproc)), shards
    killed_at = kill_after_first_checkpoint(command(b), b, DS_STEPS, nproc=nproc)
    ok(tinybert(*command(b), "--resume", nproc=nproc))

    wa, wb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    assert wa.keys() == wb.keys()
    # Measured on CPU: identical (the checkpoint restores DeepSpeed's fp32 master weights, optimizer and RNG).
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-3, rtol=1e-3, msg=lambda m: f"killed at {killed_at}: {k}: {m}")
    assert_log_has_each_step_once(b, DS_STEPS)
    for ra, rb in zip(records(a, "train"), records(b, "train")):
        for term in terms:
            assert rb[term] == pytest.approx(ra[term], rel=1e-3), (killed_at, ra["step"], term)


# ---------------------------------------------------------------------------------------------------- accumulation


def test_two_micro_batches_of_16_make_the_update_of_one_batch_of_32(minilm_dir, books, tmp_path):
    """batch_size=32 with grad_accum=2 (micro-batches of 16) vs grad_accum=1, fp32, a student without dropout (the
    teacher is always in eval mode), in-process: same weights after 2 optimizer steps."""
    from tinybert.general import run_general
    from tinybert.recipe import load_recipe

    student = save_student(tmp_path / "student", minilm_dir, hidden_size=96, num_hidden_layers=2,
                           num_attention_heads=12, intermediate_size=192, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    initial = load_file(student / "model.safetensors")
    weights = {}
    for accum in (1, 2):
        recipe = load_recipe("general", ["batch_size=32", "max_seq_length=64", "max_steps=2", f"grad_accum={accum}",
                                         "precision=fp32", "heldout_fraction=0", "learning_rate=1e-3",
                                         "warmup_ratio=0"])
        out = run_general(recipe, teacher=str(minilm_dir), corpus=[str(books / CAROL)], output=tmp_path / f"x{accum}",
                          student=str(student), progress=False, echo=lambda *a, **k: None)
        weights[accum] = load_file(out / "model.safetensors")
        assert [r["step"] for r in records(tmp_path / f"x{accum}", "train")] == [1, 2]
    one, two = weights[1], weights[2]
    moved = 0
    for k in one:
        update = one[k] - initial[k]
        moved += bool(update.abs().max() > 0)
        # Relative to the update itself (an absolute test on the weights would pass even if nothing moved).
        diff = (two[k] - one[k]).norm().item()
        # Measured: at most 1.4e-6 of the update (summation order differs between 2 x 16 and 1 x 32).
        assert diff <= 1e-5 * update.norm().item() + 1e-8, f"{k}: |diff| {diff:.3g}, |update| " \
                                                           f"{update.norm().item():.3g}"
    assert moved > len(one) // 2


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def previous_run(minilm_dir, books, module_tmp) -> Path:
    """A finished 2-step run (checkpoints at steps 1 and 2) that bad commands must leave as it is."""
    output = module_tmp / "previous"
    ok(distill(minilm_dir, books / CAROL, output, *SMALL, "max_steps=2", "save_every=1", "heldout_fraction=0",
               "precision=fp32", "layer_map=[0,2,3,5,6]"))
    assert checkpoint_steps(output) == [1, 2]
    return output


@pytest.fixture(scope="module")
def bad_inputs(minilm_dir, books, module_tmp) -> dict:
    root = module_tmp / "bad"
    root.mkdir()
    (root / "empty.txt").write_text("\n  \n\t\n")
    (root / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n".encode("latin-1"))
    save_student(root / "vocab-1000", minilm_dir, vocab_size=1000, hidden_size=96, num_hidden_layers=2,
                 num_attention_heads=12, intermediate_size=192)
    save_student(root / "heads-4", minilm_dir, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=192)
    return {"empty": root / "empty.txt", "latin1": root / "latin1.txt", "vocab": root / "vocab-1000",
            "heads": root / "heads-4", "nowhere": root / "no-such-teacher", "minilm": minilm_dir,
            "carol": books / CAROL}


# case -> (extra arguments with {names} from bad_inputs, {{ for a brace, text the error line must contain), after a
# valid 4-layer map. Every case but "run in output" passes --overwrite, so it must fail before it touches the
# previous run.
BAD = {
    "empty corpus": (["--corpus", "{empty}"], "corpus is empty"),
    "not UTF-8": (["--corpus", "{latin1}"], "corpus file is not UTF-8 text (bad byte at offset 3): {latin1}"),
    "vocab mismatch": (["--corpus", "{carol}", "--student", "{vocab}"],
                       "has a vocabulary of 1000 tokens but the teacher has 30522"),
    "head mismatch": (["--corpus", "{carol}", "--student", "{heads}", "layer_map=uniform"],
                      "the teacher has 12 heads and the student 4"),
    "invalid layer map": (["--corpus", "{carol}", "layer_map=[0,3,2,6,6]"],
                          "layer map [0, 3, 2, 6, 6] is invalid: it must be strictly increasing"),
    "too long layer map": (["--corpus", "{carol}", "layer_map=[0,1,2,3,4,5,6]"],
                           "it has 7 entries but a 4-layer student needs 5"),
    "no uniform map": (["--corpus", "{carol}", "layer_map=uniform"],
                       "no uniform layer map from a 6-layer teacher to a 4-layer student"),
    "relation heads": (["--corpus", "{carol}", "terms={{q_relation: 1, k_relation: 1}}", "relation_heads=7"],
                       "recipe key relation_heads: 7 does not divide both the teacher's width 384 and the student's "
                       "312; use a common divisor, e.g. 8 (any of 1, 2, 3, 4, 6, 8, 12, 24)"),
    "teacher layer": (["--corpus", "{carol}", "terms={{v_relation: 1}}", "teacher_layer=7"],
                      "recipe key teacher_layer: 7 is not a layer of the 6-layer teacher; use 1 to 6"),
    "v1 head mismatch": (["--corpus", "{carol}", "--student", "{heads}", "terms={{attention_relation: 1}}"],
                         "recipe terms attention_relation (MiniLM) compare teacher and student head by head, but the "
                         "teacher has 12 heads and the student 4; give the student 12 heads"),
    "unknown key": (["--corpus", "{carol}", "learnig_rate=1e-4"], "did you mean learning_rate?"),
    "wrong type": (["--corpus", "{carol}", "batch_size=eight"], "recipe key batch_size: expected int, got 'eight'"),
    "missing teacher": (["--corpus", "{carol}", "--teacher", "{nowhere}"], "{nowhere} is neither a preset"),
    "missing corpus": (["--corpus", "{nowhere}.txt"], "corpus path does not exist: {nowhere}.txt"),
    "run in output": (["--corpus", "{carol}", "layer_map=[0,2,3,5,6]"],
                      "already holds a run; pass --resume to continue it, --overwrite to replace it"),
}


@pytest.fixture(scope="module")
def bad_runs(previous_run, bad_inputs, module_tmp) -> dict:
    """Every BAD case against its own copy of `previous_run`, two at a time: case -> (result, expected text,
    snapshot of the copy before, after)."""
    root = module_tmp / "bad-runs"

    def run(case):
        extra, expected = BAD[case]
        names = {k: str(v) for k, v in bad_inputs.items()}
        extra = [a.format(**names) for a in extra]
        output = root / case.replace(" ", "-")
        shutil.copytree(previous_run, output, copy_function=os.link)  # links: a change still shows
        teacher = [] if "--teacher" in extra else ["--teacher", names["minilm"]]
        flags = [] if case == "run in output" else ["--overwrite"]
        before = snapshot(output)
        result = tinybert("distill", "--recipe", "general", *teacher, "--output", output, *SMALL, "max_steps=2",
                          "layer_map=[0,2,3,5,6]", *extra, *flags, timeout=600)
        return result, expected.format(**names), before, snapshot(output)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(BAD, pool.map(run, BAD)))


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode not in (0, None), result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_leaves_the_previous_run_intact(case, bad_runs):
    result, expected, before, after = bad_runs[case]
    line = error_line(result)
    assert expected in line, line
    assert result.returncode == 1
    assert before == after


def test_overwrite_replaces_the_previous_run_once_the_new_one_starts(minilm_dir, books, previous_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(previous_run, output)
    ok(distill(minilm_dir, books / CAROL, output, *SMALL, "max_steps=1", "save_every=1", "heldout_fraction=0",
               "precision=fp32", "layer_map=[0,2,3,5,6]", "learning_rate=1e-4", "--overwrite"))
    assert checkpoint_steps(output) == [1]
    assert [r["step"] for r in records(output)] == [1]  # the old run's two steps are gone
    assert "learning_rate: 0.0001" in (output / "recipe.yaml").read_text()


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(minilm_dir, books, tmp_path):
    output = tmp_path / "run"
    result = distill(minilm_dir, books / CAROL, output, *SMALL, "max_steps=6", "save_every=1", "heldout_fraction=0",
                     "precision=fp32", "layer_map=[0,2,3,5,6]", "learning_rate=1e30", "warmup_ratio=0")
    line = error_line(result)
    assert "loss is nan" in line or "loss is inf" in line, line
    steps = checkpoint_steps(output)
    assert steps, "the first step's loss is finite: its checkpoint must exist"
    last = f"step-{steps[-1]:07d}"
    assert f"at step {steps[-1] + 1} " in line and f"the last checkpoint {last} is intact" in line, line
    assert "lower learning_rate" in line
    assert not list((output / "checkpoints").glob(".tmp-*")) and not (output / "student").exists()
    state = torch.load(output / "checkpoints" / last / "rank0" / "state.pt", weights_only=True)
    assert json.loads((output / "checkpoints" / last / "rank0" / "state.json").read_text())["step"] == steps[-1]
    assert {"module", "optimizer", "scheduler"} <= state.keys()
    assert all(torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point())
    assert [r["step"] for r in records(output, "train")] == list(range(1, steps[-1] + 1))


# ---------------------------------------------------------------------------------------------------- dry run


def test_dry_run_prints_the_plan_and_writes_nothing(minilm_dir, books, previous_run, tmp_path):
    output = tmp_path / "never-written"
    result = ok(distill(minilm_dir, [books / CAROL, books / ALICE], output, *SMALL, "max_steps=30",
                        "layer_map=[0,2,3,5,6]", "--dry-run"))
    out = result.stdout
    assert not output.exists()
    # The precision decision first (precision.py), then the recipe with the overrides applied.
    assert out.startswith("precision: ") and out.splitlines()[1] == "recipe:" and "  batch_size: 8\n" in out and "  max_seq_length: 64\n" in out
    # Both models' shapes.
    assert "teacher: 6 layers, hidden 384, FFN 1536, 12 heads" in out
    assert "student: 4 layers, hidden 312, FFN 1200, 12 heads" in out
    # The layer map table: every student state, its teacher state, the projection and the attention pairing.
    rows = [line.split() for line in out.splitlines() if "<-" in line and line.split()[0].isdigit()]
    assert [(int(r[0]), int(r[2])) for r in rows] == [(0, 0), (1, 2), (2, 3), (3, 5), (4, 6)]
    assert all("312" in line and "384" in line for line in out.splitlines() if line.strip().startswith("4 <- 6"))
    assert "layer 4 <- layer 6" in out
    # Corpus size (two books: one held out) and the schedule.
    corpus = [line for line in out.splitlines() if line.startswith("corpus ")]
    assert len(corpus) == 2 and all(" tokens" in line for line in corpus), corpus
    assert "1 documents" in corpus[0] and "1 documents" in corpus[1]
    assert "schedule: 30 optimizer steps of 8 sequences" in out

    # A dry run against an existing run changes nothing there either (no --resume/--overwrite needed).
    before = snapshot(previous_run)
    ok(distill(minilm_dir, books / CAROL, previous_run, *SMALL, "layer_map=[0,2,3,5,6]", "--dry-run"))
    assert snapshot(previous_run) == before


# ---------------------------------------------------------------------------------------------------- MiniLMv2

V2_STEPS = 20


def test_minilmv2_terms_into_a_student_with_other_heads_fall_on_held_out_text(minilm_dir, books, tmp_path):
    """recipes/general-minilmv2.yaml as shipped (only the size keys overridden): a random 4-layer, 256-wide, 4-head
    student under the 6-layer, 384-wide, 12-head MiniLM (no uniform layer map, no common head count), 16 relation
    heads. Every relation term falls on held-out text between the first and the last evaluation, and the export
    loads in transformers."""
    student = save_student(tmp_path / "student-init", minilm_dir, hidden_size=256, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=1024)
    output = tmp_path / "run"
    result = ok(tinybert("distill", "--recipe", "general-minilmv2", "--teacher", minilm_dir, "--corpus",
                         books / ALICE, "--student", student, "--output", output, *SMALL, f"max_steps={V2_STEPS}",
                         "relation_heads=16", "learning_rate=1e-3", "warmup_ratio=0", "eval_every=1",
                         "heldout_fraction=0.05", "save_every=10", "log_every=1", "precision=fp32"))
    assert f"student written to {output / 'student'}" in result.stdout
    train, evals = records(output, "train"), records(output, "eval")
    assert [r["step"] for r in train] == list(range(1, V2_STEPS + 1))
    assert [r["step"] for r in evals] == list(range(1, V2_STEPS + 1))
    for term in V2 + ("loss",):
        first, last = evals[0][term], evals[-1][term]
        assert last < 0.9 * first, f"held-out {term}: {[round(r[term], 4) for r in evals]}"
    assert not any(t in evals[-1] for t in TERMS)  # only the recipe's terms are computed and logged
    # The same checkpoint machinery: two checkpoints with the student and no projections (nothing to project).
    assert checkpoint_steps(output) == [10, 20]
    state = torch.load(output / "checkpoints" / f"step-{V2_STEPS:07d}" / "rank0" / "state.pt", weights_only=True)
    assert state["module"] and all(k.startswith("student.") for k in state["module"])
    assert_loads_in_transformers(output / "student")


def test_minilmv2_dry_run_pairs_the_layers_and_says_why_no_head_check(minilm_dir, books, tmp_path):
    student = save_student(tmp_path / "student-init", minilm_dir, hidden_size=256, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=1024)
    output = tmp_path / "never-written"
    out = ok(tinybert("distill", "--recipe", "general-minilmv2", "--teacher", minilm_dir, "--corpus", books / CAROL,
                      "--student", student, "--output", output, *SMALL, "relation_heads=16", "teacher_layer=5",
                      "--dry-run")).stdout
    assert not output.exists()
    assert "student: 4 layers, hidden 256, FFN 1024, 4 heads" in out
    assert "layer map: not used (no embedding, hidden or attention term)" in out
    assert "relation terms (MiniLM; teacher_layer 5 teaches the student's last layer):" in out
    for term in V2:
        assert (f"  {term}: student layer 4 <- layer 5; no head-count check: 16 relation heads split each width "
                f"(d_r 24 teacher, 16 student), whatever the attention heads (12 teacher, 4 student)") in out
