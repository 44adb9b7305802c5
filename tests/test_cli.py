"""The `tinybert` command as a user runs it, in a subprocess: output, exit codes, the directories it writes, and
one-line errors (no traceback) that leave an existing --output untouched."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinybert.checkpoint import load_model, load_tokenizer, save_model
from tinybert.model import Bert, BertConfig

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def tinybert(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TINYBERT_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "tinybert.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _snapshot(directory: Path) -> dict:
    """Every file and folder under `directory` (hidden ones too) with its bytes' hash and its mode."""
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                        p.stat().st_mode)
        for p in sorted(directory.rglob("*"))
    }


def _strip_prefix(weights: dict) -> dict:
    return {k.removeprefix("bert."): v for k, v in weights.items()}


# ---------------------------------------------------------------------------------------------------- entry points


def test_version():
    result = tinybert("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tinybert 0.1.0" and result.stderr == ""


def test_repo_root_cli_py_and_console_script_show_help():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    by_file = subprocess.run([sys.executable, "cli.py", "--help"], cwd=REPO, env=env, capture_output=True, text=True)
    assert by_file.returncode == 0, by_file.stderr
    script = Path(sys.executable).parent / "tinybert"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}: pip install -e .")
    by_script = subprocess.run([str(script), "--help"], env=env, capture_output=True, text=True)
    assert by_script.returncode == 0, by_script.stderr
    for out in (by_file.stdout, by_script.stdout):
        assert "Usage:" in out and re.search(r"^[│ ]*info ", out, re.M) and re.search(r"^[│ ]*init ", out, re.M), out


# ---------------------------------------------------------------------------------------------------- info


def _param_lines(stdout: str) -> dict[str, int]:
    counts = dict(re.findall(r"^params (\w+)\s+([\d,]+)", stdout, flags=re.M))
    return {part: int(n.replace(",", "")) for part, n in counts.items()}


def test_info_on_a_preset():
    result = tinybert("info", "tinybert-4l-312d")
    assert result.returncode == 0, result.stderr
    counts = _param_lines(result.stdout)
    assert counts == Bert(BertConfig.preset("tinybert-4l-312d")).num_parameters()
    assert counts["embeddings"] + counts["encoder"] + counts["heads"] == counts["total"]
    assert "4 layers, hidden 312, FFN 1200, 12 heads of 26" in result.stdout
    assert re.search(r"^size on disk\s+54\.7 MB \(fp32 weights; a preset is not on disk\)$", result.stdout, re.M)


def test_info_on_the_minilm_directory(minilm_dir):
    result = tinybert("info", minilm_dir)
    assert result.returncode == 0, result.stderr
    counts = _param_lines(result.stdout)
    assert counts == load_model(minilm_dir).num_parameters()
    assert counts["embeddings"] + counts["encoder"] + counts["heads"] == counts["total"]
    # An independent count: every tensor in the file but the position-id buffer (BertModel: encoder + pooler).
    weights = load_file(minilm_dir / "model.safetensors")
    assert counts["total"] == sum(t.numel() for k, t in weights.items() if not k.endswith("position_ids"))
    size = sum(p.stat().st_size for p in minilm_dir.rglob("*") if p.is_file())
    assert re.search(rf"^size on disk\s+{size / 1024**2:.1f} MB$", result.stdout, re.M), result.stdout
    assert "6 layers, hidden 384" in result.stdout


# ---------------------------------------------------------------------------------------------------- init


def test_init_from_a_preset_writes_a_model_transformers_loads(minilm_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "student"
    result = tinybert("init", "--preset", "tinybert-4l-312d", "--tokenizer", minilm_dir, "--output", out)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    hf, info = AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (hf.config.num_hidden_layers, hf.config.hidden_size, hf.config.intermediate_size) == (4, 312, 1200)
    assert len(AutoTokenizer.from_pretrained(str(out))) == hf.config.vocab_size == 30522
    # Random init is BERT's: N(0, 0.02) weights.
    std = hf.encoder.layer[0].intermediate.dense.weight.std().item()
    assert 0.018 < std < 0.022


def test_init_from_teacher_copies_exactly_the_chosen_layers(minilm_dir, tmp_path):
    out = tmp_path / "student"
    result = tinybert("init", "--from-teacher", minilm_dir, "--layers", "2,4,6", "--output", out)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    teacher = _strip_prefix(load_file(minilm_dir / "model.safetensors"))
    student = load_file(out / "model.safetensors")
    layer = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
    copied = set()
    for name, tensor in student.items():
        if m := layer.match(name):
            j, rest = int(m[1]), m[2]
            source = f"encoder.layer.{[1, 3, 5][j]}.{rest}"  # student layer j <- teacher layer (2, 4, 6)[j]
        else:
            source = name  # embeddings and pooler
        assert torch.equal(tensor, teacher[source]), f"{name} != teacher {source}"
        copied.add(source)
    expected = {k for k in teacher if not layer.match(k) or int(layer.match(k)[1]) in (1, 3, 5)}
    expected -= {"embeddings.position_ids"}
    assert copied == expected


# ---------------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def dirs(minilm_dir, module_tmp):
    """A small valid teacher (MiniLM tokenizer), broken copies of it, a tokenizer with an 8-token vocabulary, and
    an --output directory that already holds a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = module_tmp / "cli"
    root.mkdir()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(minilm_dir)
    teacher = root / "teacher"
    save_model(Bert(BertConfig(vocab_size=len(tokenizer), **SMALL)), teacher, tokenizer)

    def broken(name, edit):
        directory = root / name
        directory.mkdir()
        for f in teacher.iterdir():
            (directory / f.name).write_bytes(f.read_bytes())
        edit(directory)
        return directory

    def set_config(**changes):
        def edit(d):
            (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **changes}))
        return edit

    def wrong_shape(d):
        weights = load_file(d / "model.safetensors")
        weights["encoder.layer.1.attention.self.key.weight"] = torch.zeros(64, 32)
        save_file(weights, d / "model.safetensors")

    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]
    small = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    small.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    small_tokenizer = root / "small-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=small, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(small_tokenizer))
    assert len(load_tokenizer(small_tokenizer)) == 8

    existing = root / "existing"
    save_model(Bert(BertConfig(vocab_size=len(tokenizer), **SMALL)), existing, tokenizer)
    (existing / "notes.txt").write_text("mine\n")
    return {
        "teacher": teacher,
        "no-config": broken("no-config", lambda d: (d / "config.json").unlink()),
        "roberta": broken("roberta", set_config(model_type="roberta")),
        "wrong-shape": broken("wrong-shape", wrong_shape),
        "truncated": broken("truncated", truncate),
        "small-tokenizer": small_tokenizer,
        "existing": existing,
    }


# (command and arguments with {names} from `dirs`, text the one error line must contain). Each init case writes to
# its own copy of a directory that already holds a model; all but "output not empty" pass --overwrite, so the command
# must fail before it writes anything there.
BAD = {
    "unknown preset": (["init", "--preset", "tinybert-9l", "--tokenizer", "{minilm}"], "unknown preset 'tinybert-9l'"),
    "no config.json": (["init", "--from-teacher", "{no-config}", "--layers", "1"], "{no-config} has no config.json"),
    "not BERT": (["init", "--from-teacher", "{roberta}", "--layers", "1"], "model_type 'roberta'"),
    "wrong shape": (["init", "--from-teacher", "{wrong-shape}", "--layers", "1"],
                    "encoder.layer.1.attention.self.key.weight has shape (64, 32)"),
    "vocab mismatch": (["init", "--from-teacher", "{teacher}", "--layers", "1,2", "--tokenizer", "{small-tokenizer}"],
                       "has 8 tokens but the model's vocab_size is 30522"),
    "truncated": (["init", "--from-teacher", "{truncated}", "--layers", "1"],
                  "cannot read weights {truncated}/model.safetensors"),
    "output not empty": (["init", "--preset", "tinybert-4l-312d", "--tokenizer", "{minilm}"],
                         "already holds files; choose another --output or pass --overwrite"),
    "info nowhere": (["info", "{no-config}/nowhere"], "{no-config}/nowhere is neither a preset"),
}


@pytest.fixture(scope="module")
def bad_runs(dirs, minilm_dir, module_tmp):
    """Run every BAD case at once (each pays ~2 s of `import torch`, so they overlap): case -> (result, expected
    error text, snapshot of its --output before, snapshot after)."""
    names = {**{k: str(v) for k, v in dirs.items()}, "minilm": str(minilm_dir)}
    root = module_tmp / "outputs"

    def run(case):
        args, expected = BAD[case]
        args = [a.format(**names) for a in args]
        output = None
        if args[0] == "init":
            output = root / case.replace(" ", "-")
            shutil.copytree(dirs["existing"], output, copy_function=os.link)  # links: a change still shows
            args += ["--output", str(output)] + ([] if case == "output not empty" else ["--overwrite"])
        before = _snapshot(output) if output else None
        result = tinybert(*args)
        return result, expected.format(**names), before, _snapshot(output) if output else None

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(BAD, pool.map(run, BAD)))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_leaves_output_alone(case, bad_runs):
    result, expected, before, after = bad_runs[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert result.stdout == ""
    assert before == after
