"""Hugging Face checkpoint directories <-> our BERT: one rename table, loading any HF BERT directory (or hub id,
through download.py), exporting students that plain `transformers` loads (`AutoModel`,
`AutoModelForSequenceClassification`), and the original TinyBERT's learned projections. Uploading is publish.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tinybert.model import PRESETS, Bert, BertConfig


class CheckpointError(ValueError):
    """A model directory that cannot be read or written; the message says what, where and how to fix it."""


# One rename table, HF name -> our name; `{i}` is a layer index. Names match after the `bert.` prefix is removed.
RENAMES = [
    ("embeddings.word_embeddings.{p}", "embeddings.word.{p}"),
    ("embeddings.position_embeddings.{p}", "embeddings.position.{p}"),
    ("embeddings.token_type_embeddings.{p}", "embeddings.token_type.{p}"),
    ("embeddings.LayerNorm.{p}", "embeddings.norm.{p}"),
    ("encoder.layer.{i}.attention.self.query.{p}", "layers.{i}.attn.q.{p}"),
    ("encoder.layer.{i}.attention.self.key.{p}", "layers.{i}.attn.k.{p}"),
    ("encoder.layer.{i}.attention.self.value.{p}", "layers.{i}.attn.v.{p}"),
    ("encoder.layer.{i}.attention.output.dense.{p}", "layers.{i}.attn.out.{p}"),
    ("encoder.layer.{i}.attention.output.LayerNorm.{p}", "layers.{i}.attn_norm.{p}"),
    ("encoder.layer.{i}.intermediate.dense.{p}", "layers.{i}.up.{p}"),
    ("encoder.layer.{i}.output.dense.{p}", "layers.{i}.down.{p}"),
    ("encoder.layer.{i}.output.LayerNorm.{p}", "layers.{i}.ffn_norm.{p}"),
    ("pooler.dense.{p}", "pooler.{p}"),
    ("classifier.{p}", "classifier.{p}"),
    ("cls.predictions.transform.dense.{p}", "mlm.dense.{p}"),
    ("cls.predictions.transform.LayerNorm.{p}", "mlm.norm.{p}"),
    ("cls.predictions.bias", "mlm.bias"),
]
# Present in real checkpoints and deliberately not loaded: the position-id buffer of older transformers, the
# MLM decoder (tied to the word embeddings, its bias is cls.predictions.bias), the NSP head, and the original
# TinyBERT's distillation projections (`fit_dense`, `fit_denses.N`), which belong to the distillation.
IGNORED = re.compile(
    r"^(embeddings\.position_ids|cls\.predictions\.decoder\.(weight|bias)|cls\.seq_relationship\..*|fit_denses?\..*)$"
)


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{regex}$")


_HF_TO_OURS = [(_pattern(hf), ours) for hf, ours in RENAMES]
_OURS_TO_HF = [(_pattern(ours), hf) for hf, ours in RENAMES]


def _rename(name: str, table) -> str | None:
    for pattern, template in table:
        if m := pattern.match(name):
            return template.format(**m.groupdict())
    return None


def hf_to_ours(hf_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an HF BERT state dict (from BertModel, or with the `bert.` prefix of BertFor*) to our names.
    Returns (renamed, unexpected); TF-era `gamma`/`beta` LayerNorm names are accepted."""
    ours, unexpected = {}, []
    for name, tensor in hf_state.items():
        name = name.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
        name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        if IGNORED.match(name):
            continue
        if new := _rename(name, _HF_TO_OURS):
            ours[new] = tensor
        else:
            unexpected.append(name)
    return ours, unexpected


def ours_to_hf(state: dict[str, Tensor], *, prefix: str) -> dict[str, Tensor]:
    hf = {}
    for name, tensor in state.items():
        if (new := _rename(name, _OURS_TO_HF)) is None:
            raise CheckpointError(f"internal: no HF name for weight {name!r}")
        hf[new if new.startswith(("classifier.", "cls.")) else prefix + new] = tensor.detach().contiguous()
    return hf


# ---------------------------------------------------------------------------------------------------- loading


def _is_preset(source: str) -> bool:
    return source in PRESETS and not Path(source).exists()  # a folder of that name is a folder


def _not_a_model(source) -> CheckpointError:
    return CheckpointError(f"{source} is neither a preset ({', '.join(PRESETS)}) nor a model directory nor a hub id; "
                           f"give a preset name, the path to an HF BERT checkpoint, or a hub id such as "
                           f"huawei-noah/TinyBERT_General_4L_312D")


def resolve_model(source: str | os.PathLike, revision: str | None = None) -> str:
    """The one place a model argument is resolved, in this order: a preset name, a local directory, a hub id
    (`owner/name` or `name`), downloaded into the hub cache (or found there offline) at `revision`.
    Returns the preset name or a directory; a hub id's directory is its snapshot in the cache."""
    text = str(source)
    if _is_preset(text) or Path(text).is_dir():
        if revision:
            kind = "preset" if _is_preset(text) else "local directory"
            raise CheckpointError(f"--revision {revision}: {text} is a {kind}; --revision pins hub ids only")
        return text
    from tinybert.download import download, is_hub_id

    if Path(text).exists() or not is_hub_id(text):
        raise _not_a_model(text)
    return str(download(text, revision))


def read_config(directory: str | os.PathLike) -> BertConfig:
    """Read `config.json` of an HF BERT directory. Unknown HF fields (architectures, torch_dtype...) are ignored."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise _not_a_model(directory)
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; a model directory needs config.json and "
                              f"model.safetensors (or pytorch_model.bin), as written by save_pretrained")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-export the checkpoint") from None
    model_type = raw.get("model_type", "bert")  # the original TinyBERT's config.json carries no model_type
    if model_type != "bert":
        raise CheckpointError(f"{path} has model_type {model_type!r}; tinybert reads BERT checkpoints (model_type "
                              f"'bert') only")
    fields = {k: v for k, v in raw.items() if k in BertConfig.__dataclass_fields__}
    if raw.get("id2label"):
        fields["id2label"] = {int(k): v for k, v in raw["id2label"].items()}
    fields.pop("num_labels", None)  # decided by the weights: a classifier is present or it is not
    try:
        return BertConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_weights(directory: str | os.PathLike) -> dict[str, Tensor]:
    paths = [Path(directory) / name for name in ("model.safetensors", "pytorch_model.bin")]
    if (path := next((p for p in paths if p.is_file()), None)) is None:
        raise CheckpointError(f"{directory} has no model.safetensors or pytorch_model.bin")
    try:
        return load_file(path) if path == paths[0] else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt files raise many different exception types
        raise CheckpointError(f"cannot read weights {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''} (the file is truncated or corrupt; copy or "
                              f"export it again)") from None


def load_model(source: str | os.PathLike, revision: str | None = None) -> Bert:
    """A preset name (random weights), an HF BERT checkpoint directory or a hub id (weights loaded exactly)."""
    source = resolve_model(source, revision)
    if _is_preset(source):
        return Bert(BertConfig.preset(source))
    config = read_config(source)
    weights, unexpected = hf_to_ours(read_weights(source))
    if "classifier.weight" in weights:
        num_labels = weights["classifier.weight"].shape[0]
        id2label = config.id2label if config.id2label and len(config.id2label) == num_labels else None
        problem_type = config.problem_type or ("regression" if num_labels == 1 else "single_label_classification")
        config = config.replace(num_labels=num_labels, id2label=id2label, problem_type=problem_type)
    else:
        config = config.replace(num_labels=0, id2label=None, problem_type=None)
    model = Bert(config, mlm_head="mlm.dense.weight" in weights)
    if "pooler.weight" not in weights and "pooler.bias" not in weights:
        # BertForMaskedLM checkpoints have no pooler (add_pooling_layer=False). Like transformers, keep BERT's
        # initialisation and say so: distillation reads hidden states and scores, fine-tuning trains the pooler.
        warnings.warn(f"{source} has no pooler weights (a BertForMaskedLM checkpoint?); the pooler is newly "
                      f"initialised", stacklevel=2)
        weights.update({f"pooler.{p}": t for p, t in model.pooler.state_dict().items()})
    load_state(model, weights, unexpected, where=str(source))
    return model


# The original TinyBERT's learned projections (TinyBertForPreTraining.fit_dense, or fit_denses.N in v2 checkpoints),
# which IGNORED keeps out of the student: they seed the distillation's projections instead (distill.Projections).
PROJECTION = re.compile(r"^(?:bert\.)?(fit_dense\.(?:weight|bias)|fit_denses\.\d+\.(?:weight|bias))$")


def read_projections(source: str | os.PathLike) -> dict[str, Tensor]:
    """The `fit_dense.*` or `fit_denses.N.*` weights of a model directory, under those names; {} for a preset or
    a checkpoint without them (every checkpoint but the original TinyBERT's general ones)."""
    source = resolve_model(source)
    if _is_preset(source):
        return {}
    return {m.group(1): t for name, t in read_weights(source).items() if (m := PROJECTION.match(name))}


def load_state(model: Bert, weights: dict[str, Tensor], unexpected: list[str] = (), *, where: str) -> None:
    """Copy weights into the model; any missing, unexpected or wrongly shaped weight is an error that names it
    by its HF name, the name the user sees in the file."""
    expected = model.state_dict()
    missing = [_hf_name(k) for k in expected if k not in weights]
    unexpected = list(unexpected) + [_hf_name(k) for k in weights if k not in expected]
    parts = [f"{what} {_names(names)}" for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if parts:
        raise CheckpointError(f"{where}: weights do not match a BERT of its config.json ({'; '.join(parts)}); "
                              f"is config.json the one saved with these weights?")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{where}: weight {_hf_name(name)} has shape {tuple(tensor.shape)} but config.json "
                                  f"implies {tuple(expected[name].shape)}; the config and the weights come from "
                                  f"different models")
    model.load_state_dict(weights, strict=True)


def _hf_name(name: str) -> str:
    return _rename(name, _OURS_TO_HF) or name


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_tokenizer(directory: str | os.PathLike, *, vocab_size: int | None = None, revision: str | None = None):
    """`AutoTokenizer.from_pretrained(dir)` of a directory or hub id: in transformers 5.x
    `BertTokenizerFast(vocab_file=...)` silently builds a 5-token vocabulary, so never construct one from a vocab
    file directly."""
    from transformers import AutoTokenizer

    directory = resolve_model(directory, revision)
    if _is_preset(directory):
        raise CheckpointError(f"{directory} is a preset, which has no tokenizer; give a model directory or hub id")
    # A folder with vocab.txt alone (the original BERT and TinyBERT releases: no tokenizer_config.json, no
    # model_type) leaves AutoTokenizer without a class to pick; such a vocabulary is BERT's WordPiece.
    bare = not any((Path(directory) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **({"tokenizer_type": "bert"} if bare else {}))
    except Exception as e:
        raise CheckpointError(f"cannot load a tokenizer from {directory} ({type(e).__name__}); it needs vocab.txt or "
                              f"tokenizer.json") from None
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise CheckpointError(f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's vocab_size is "
                              f"{vocab_size}; use the tokenizer the model was trained with")
    return tokenizer


# ---------------------------------------------------------------------------------------------------- saving


def hf_config(config: BertConfig) -> dict:
    """config.json contents that `transformers` reads as a BertConfig."""
    import transformers

    d = {k: v for k, v in vars(config).items() if k not in ("num_labels", "problem_type", "id2label")}
    d.update(model_type="bert", architectures=["BertForSequenceClassification" if config.num_labels else "BertModel"])
    if config.num_labels:
        id2label = config.id2label or {i: f"LABEL_{i}" for i in range(config.num_labels)}
        d.update(id2label={str(i): label for i, label in id2label.items()},
                 label2id={label: i for i, label in id2label.items()}, problem_type=config.problem_type)
    return {**d, "transformers_version": transformers.__version__}


def save_model(model: Bert, directory: str | os.PathLike, tokenizer=None):
    """Write an HF directory: config.json, model.safetensors (HF names; `bert.` prefix when there is a classifier,
    as BertForSequenceClassification writes it) and the tokenizer files, not the MLM head. They are written into a
    temporary directory and moved into place, so a failed save leaves no half model behind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mlm.")}
    prefix = "bert." if model.config.num_labels else ""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-") as tmp:
        tmp = Path(tmp)
        save_file(ours_to_hf(state, prefix=prefix), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():
            if path.is_file():  # safetensors writes 0600; an exported model is for others to read
                os.chmod(path, 0o666 & ~umask)
                os.replace(path, directory / path.name)
            else:
                shutil.move(path, directory / path.name)
    return directory


def init_from_teacher(teacher: Bert, layers: list[int]) -> Bert:
    """A student of the teacher's width whose layer j is a copy of teacher layer layers[j] (1-based),
    with the teacher's embeddings and pooler (DistilBERT-style initialisation)."""
    L = teacher.config.num_hidden_layers
    if not layers or any(not 1 <= i <= L for i in layers) or sorted(set(layers)) != list(layers):
        raise CheckpointError(f"--layers {','.join(map(str, layers))}: give strictly increasing teacher layers between "
                              f"1 and {L}")
    student = Bert(teacher.config.replace(num_hidden_layers=len(layers), num_labels=0, id2label=None,
                                          problem_type=None))
    student.embeddings.load_state_dict(teacher.embeddings.state_dict())
    student.pooler.load_state_dict(teacher.pooler.state_dict())
    for j, i in enumerate(layers):
        student.layers[j].load_state_dict(teacher.layers[i - 1].state_dict())
    return student
