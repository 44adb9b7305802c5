"""Hub ids wherever a model is taken: downloads from the fake Hub of tests/fakehub.py (only the files a model needs,
into the normal hub cache, pinned by --revision), the same cache read with HF_HUB_OFFLINE=1, one-line errors, and
the original TinyBERT's general checkpoints (TinyBertForPreTraining: a `bert.` encoder and `fit_dense`) as students
whose learned projection starts task distillation."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from fakehub import closed_port, online_env, running  # tests/fakehub.py
from tinybert import task as task_module
from tinybert.checkpoint import CheckpointError, load_model, load_tokenizer, save_model
from tinybert.cli import main
from tinybert.distill import Projections
from tinybert.download import hub_snapshot
from tinybert.model import Bert, BertConfig

REPO = Path(__file__).resolve().parents[1]
WANTED = {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json"}  # of the MiniLM folder: what a model needs, nothing else
TINY = dict(vocab_size=30522, num_hidden_layers=2, num_attention_heads=4)


def tinybert(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinybert.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def same_weights(a: Bert, b: Bert) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------- the original TinyBERT


def original_tinybert_state(config: BertConfig, fit_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict under the names of the original code's TinyBertForPreTraining (huawei-noah/Pretrained-Language-
    Model, TinyBERT/transformer/modeling.py): BertModel under `bert.`, the pre-training heads under `cls.` (the
    decoder tied to the word embeddings), and `fit_dense`, Linear(hidden -> fit_size), random values."""
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"bert.embeddings.word_embeddings.weight": (V, H),
              "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, H),
              "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, H)}
    linear = lambda name, n_out, n_in: {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}  # noqa: E731
    norm = lambda name: {f"{name}.weight": (H,), f"{name}.bias": (H,)}  # noqa: E731
    shapes.update(norm("bert.embeddings.LayerNorm"))
    for i in range(config.num_hidden_layers):
        layer = f"bert.encoder.layer.{i}"
        for part in ("query", "key", "value"):
            shapes.update(linear(f"{layer}.attention.self.{part}", H, H))
        shapes.update({**linear(f"{layer}.attention.output.dense", H, H), **norm(f"{layer}.attention.output.LayerNorm"),
                       **linear(f"{layer}.intermediate.dense", I, H), **linear(f"{layer}.output.dense", H, I),
                       **norm(f"{layer}.output.LayerNorm")})
    shapes.update({**linear("bert.pooler.dense", H, H), **linear("cls.predictions.transform.dense", H, H),
                   **norm("cls.predictions.transform.LayerNorm"), "cls.predictions.bias": (V,),
                   **linear("cls.seq_relationship", 2, H), **linear("fit_dense", fit_size, H)})
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    return state


def write_original_tinybert(folder: Path, config: BertConfig, vocab: Path, fit_size: int) -> dict:
    """The layout of huawei-noah/TinyBERT_General_4L_312D: config.json without model_type (with the original's own
    keys), pytorch_model.bin, vocab.txt and nothing else. Returns the state dict written."""
    folder.mkdir(parents=True)
    state = original_tinybert_state(config, fit_size)
    torch.save(state, folder / "pytorch_model.bin")
    original = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "intermediate_size", "hidden_act", "hidden_dropout_prob",
                                                "attention_probs_dropout_prob", "max_position_embeddings",
                                                "type_vocab_size", "initializer_range")}
    (folder / "config.json").write_text(json.dumps({**original, "cell": {}, "emb_size": config.hidden_size,
                                                    "pre_trained": "", "structure": [], "training": ""}))
    shutil.copy(vocab, folder / "vocab.txt")
    return state


# -------------------------------------------------------------------------------------------------- the fake hub


@pytest.fixture(scope="module")
def hub(minilm_dir, module_tmp):
    """The fake hub with me/minilm (the real MiniLM, beside files a model does not need), me/tiny (two commits on
    main: 2 layers, then 3) and me/tinybert-general (the original TinyBERT's format, a .bin and vocab.txt only)."""
    with running() as server:
        server.add_model("me/minilm", minilm_dir, extra={"tf_model.h5": b"tf", "onnx/model.onnx": b"onnx",
                                                         "README.md": b"# MiniLM"})
        tokenizer = load_tokenizer(minilm_dir)
        server.commits = {}
        for layers in (2, 3):
            folder = module_tmp / f"tiny-{layers}"
            torch.manual_seed(layers)
            save_model(Bert(BertConfig(hidden_size=32, intermediate_size=64, **{**TINY, "num_hidden_layers": layers})),
                       folder, tokenizer)
            server.commits[layers] = server.add_model("me/tiny", folder)
        config = BertConfig(hidden_size=32, intermediate_size=64, **TINY)
        server.original = write_original_tinybert(module_tmp / "tinybert-general", config, minilm_dir / "vocab.txt",
                                                  fit_size=64)
        server.add_model("me/tinybert-general", module_tmp / "tinybert-general")
        yield server


@pytest.fixture(scope="module")
def home(module_tmp) -> Path:
    return module_tmp / "hf-home"  # the Hugging Face home (hub cache in home/hub) the module's runs share


@pytest.fixture(scope="module")
def env(hub, home) -> dict:
    """Online, against the fake hub; generous timeouts: the CPUs of a test machine may be busy."""
    return online_env(home, HF_ENDPOINT=hub.endpoint, HF_HUB_ETAG_TIMEOUT="120", HF_HUB_DOWNLOAD_TIMEOUT="120")


@pytest.fixture(scope="module")
def offline_env(env) -> dict:
    """The same cache, offline, and an endpoint where nothing listens: a request would fail loudly."""
    return {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}


@pytest.fixture(scope="module")
def minilm_info(hub, env) -> subprocess.CompletedProcess:
    """`tinybert info me/minilm`, online: the download that fills the cache for the offline tests."""
    return tinybert("info", "me/minilm", env=env)


@pytest.fixture
def cache(home, monkeypatch) -> Path:
    """This process reads the module's hub cache (offline, as conftest.py sets it)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    assert constants.is_offline_mode()
    return home / "hub"


# ----------------------------------------------------------------------------------------------------- the tests


def test_hub_id_downloads_only_what_a_model_needs_and_equals_the_local_folder(minilm_info, hub, minilm_dir, cache):
    assert minilm_info.returncode == 0, minilm_info.stderr
    assert minilm_info.stdout.startswith("model            me/minilm\n")
    assert "6 layers, hidden 384" in minilm_info.stdout and "params total         22,713,216" in minilm_info.stdout
    assert set(hub.downloads("me/minilm")) == WANTED  # no README, TF weights or ONNX graph
    assert not hub.unknown

    folder = Path(next((cache / "models--me--minilm" / "snapshots").iterdir()))
    assert hub_snapshot(folder) == ("me/minilm", folder.name)
    assert same_weights(load_model("me/minilm"), load_model(minilm_dir))  # the hub id, from the cache
    assert load_tokenizer("me/minilm").get_vocab() == load_tokenizer(minilm_dir).get_vocab()


def test_revision_pins_a_commit(hub, env, cache):
    latest = tinybert("info", "me/tiny", env=env)
    pinned = tinybert("info", "me/tiny", "--revision", hub.commits[2], env=env)
    assert latest.returncode == 0 and pinned.returncode == 0, latest.stderr + pinned.stderr
    assert "shape            3 layers" in latest.stdout
    assert "shape            2 layers" in pinned.stdout
    # The Python API pins the same way (here from the cache the commands filled).
    assert load_model("me/tiny", revision=hub.commits[2]).config.num_hidden_layers == 2
    assert load_model("me/tiny").config.num_hidden_layers == 3
    line = one_line_error(tinybert("info", "me/tiny", "--revision", "v9", env=env))
    assert line == "error: me/tiny has no revision 'v9' on 127.0.0.1; give a branch, tag or commit of it to --revision"


def test_offline_a_cached_hub_id_loads_without_a_request(minilm_info, hub, offline_env):
    assert minilm_info.returncode == 0, minilm_info.stderr
    before = len(hub.requests)
    result = tinybert("info", "me/minilm", env=offline_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == minilm_info.stdout
    assert len(hub.requests) == before


def test_offline_an_uncached_hub_id_is_one_line(offline_env, home):
    line = one_line_error(tinybert("info", "me/absent", env=offline_env))
    assert line == (f"error: me/absent is not in the hub cache ({home / 'hub'}) and HF_HUB_OFFLINE=1 forbids "
                    f"downloading it; run once online to cache it, or give a local model directory")


@pytest.mark.parametrize("case", ["missing repo", "unreachable", "revision of a folder", "not a hub id"])
def test_hub_failures_are_one_line(case, hub, env, minilm_dir):
    args, expected = {
        "missing repo": (["info", "me/absent"], "error: me/absent is no local directory, preset or model on "
                                                "127.0.0.1 (a typo? a private repo needs hf auth login or HF_TOKEN)"),
        "unreachable": (["info", "me/absent"], "error: cannot download me/absent: 127.0.0.1 cannot be reached "
                                               "(ConnectError) and the hub cache does not hold it; check the network "
                                               "(or HF_ENDPOINT), or give a local model directory"),
        "revision of a folder": (["info", minilm_dir, "--revision", "main"],
                                 f"error: --revision main: {minilm_dir} is a local directory; --revision pins hub ids "
                                 f"only"),
        "not a hub id": (["info", "a/b/c"], "error: a/b/c is neither a preset (bert-base, tinybert-4l-312d, "
                                            "tinybert-6l-768d) nor a model directory nor a hub id"),
    }[case]
    if case == "unreachable":
        env = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    line = one_line_error(tinybert(*args, env=env))
    assert line.startswith(expected), line


def test_original_tinybert_loads_as_a_student(hub, env, cache, minilm_dir):
    result = tinybert("info", "me/tinybert-general", env=env)  # a .bin only: the fallback download
    assert result.returncode == 0, result.stderr
    assert "2 layers, hidden 32" in result.stdout and "masked-LM head" in result.stdout
    assert set(hub.downloads("me/tinybert-general")) == {"pytorch_model.bin", "vocab.txt", "config.json"}

    student, state = load_model("me/tinybert-general"), hub.original
    assert torch.equal(student.embeddings.word.weight, state["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(student.layers[1].attn.q.weight, state["bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(student.layers[0].down.bias, state["bert.encoder.layer.0.output.dense.bias"])
    assert torch.equal(student.pooler.weight, state["bert.pooler.dense.weight"])
    assert torch.equal(student.mlm.dense.weight, state["cls.predictions.transform.dense.weight"])
    # vocab.txt alone (no tokenizer_config.json) reads as BERT's WordPiece, the same vocabulary as MiniLM's
    assert load_tokenizer("me/tinybert-general").get_vocab() == load_tokenizer(minilm_dir).get_vocab()


@pytest.mark.parametrize("shared", [False, True])
def test_original_fit_dense_starts_task_distillation(shared, hub, env, cache, minilm_dir, tmp_path, monkeypatch,
                                                     capsys):
    """Stage 1 starts with the checkpoint's fit_dense (per-state projections: a copy in each), not at random."""
    assert tinybert("info", "me/tinybert-general", env=env).returncode == 0  # cached for this offline process
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    save_model(Bert(BertConfig(hidden_size=64, intermediate_size=128, num_labels=2, id2label={0: "no", 1: "yes"},
                               problem_type="single_label_classification", **TINY)), teacher,
               load_tokenizer(minilm_dir))
    rows = "".join(f"is {w} red?,{'yes' if i % 2 else 'no'}\n" for i, w in enumerate(["a rose", "snow", "blood",
                                                                                          "coal", "a cherry", "ice"]))
    (tmp_path / "train.csv").write_text("text,y\n" + rows)
    started = []
    run_stage = task_module.run_stage

    def first_stage(stage, *args, **kwargs):
        if not started:
            started.append({k: v.clone() for k, v in stage.module.projections.state_dict().items()})
        return run_stage(stage, *args, **kwargs)

    monkeypatch.setattr(task_module, "run_stage", first_stage)
    code = 0
    try:
        main(["distill", "--recipe", "task", "--teacher", str(teacher), "--student", "me/tinybert-general",
              "--train", str(tmp_path / "train.csv"), "--validation", str(tmp_path / "train.csv"), "--text-columns",
              "text", "--label-column", "y", "--output", str(tmp_path / "run"), "batch_size=3", "epochs=1",
              "precision=fp32", f"shared_projection={str(shared).lower()}"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    assert code in (0, None), out.err
    assert "the projections start from its fit_dense (not random)" in out.out
    fit = {p: hub.original[f"fit_dense.{p}"] for p in ("weight", "bias")}
    names = ["fit_dense"] if shared else [f"fit_denses.{j}" for j in range(3)]  # states 0..2 of a 2-layer student
    assert sorted(started[0]) == sorted(f"{n}.{p}" for n in names for p in fit)
    assert all(torch.equal(started[0][f"{n}.{p}"], fit[p]) for n in names for p in fit)


def test_projections_start_from_fit_denses_or_say_why_not():
    fit = {f"fit_denses.{j}.{p}": torch.randn((8, 4) if p == "weight" else (8,)) for j in range(3)
           for p in ("weight", "bias")}
    per_state = Projections(4, 8, 3)
    assert per_state.start_from(fit) == "the projections start from its fit_denses (not random)"
    assert torch.equal(per_state.fit_denses[2].weight, fit["fit_denses.2.weight"])
    before = {k: v.clone() for k, v in Projections(4, 8, 5).state_dict().items()}
    five = Projections(4, 8, 5)
    five.load_state_dict(before)
    assert five.start_from(fit) == ("its projections (fit_denses.0, fit_denses.1, fit_denses.2) do not match the "
                                    "recipe's 5 (one per state); they start random")
    assert all(torch.equal(v, five.state_dict()[k]) for k, v in before.items())
    wide = {"fit_dense.weight": torch.randn(16, 4), "fit_dense.bias": torch.randn(16)}
    assert Projections(4, 8, 3, shared=True).start_from(wide) == ("its projections (weight (16, 4)) do not fit "
                                                                  "Linear(4 -> 8); they start random")
    assert Projections(8, 8, 3).start_from(wide).startswith("its fit_dense projections are unused")
    assert Projections(4, 8, 3).start_from({}) is None


def test_read_config_of_a_missing_folder_names_all_three_kinds(tmp_path):
    with pytest.raises(CheckpointError, match="is neither a preset .* nor a model directory nor a hub id"):
        load_model(tmp_path / "nowhere")


def test_a_model_from_the_cache_is_named_by_its_hub_id_in_a_card():
    """A run records a hub model's cache folder; the card's base_model and links want the repo id back."""
    from tinybert.publish import _hub_id

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = f"/home/me/.cache/huggingface/hub/models--huawei-noah--TinyBERT_General_4L_312D/snapshots/{commit}"
    assert hub_snapshot(folder) == ("huawei-noah/TinyBERT_General_4L_312D", commit)
    assert _hub_id(folder) == "huawei-noah/TinyBERT_General_4L_312D"
    assert _hub_id(f"/cache/models--bert-base-uncased/snapshots/{commit}") == "bert-base-uncased"
    assert hub_snapshot("/home/me/runs/student") is None and _hub_id("/home/me/runs/student") is None
