"""tinybert.checkpoint against transformers: students we export load in plain transformers with no warnings and
give the same outputs; checkpoints transformers writes load into our BERT; bad checkpoints fail with a message
naming them."""

import json
import logging
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers import BertConfig as HFConfig
from transformers import BertForMaskedLM, BertForPreTraining, BertForSequenceClassification

from tinybert.checkpoint import CheckpointError, init_from_teacher, load_model, load_tokenizer, save_model
from tinybert.model import Bert, BertConfig

# Small enough to build in milliseconds, shaped like a real BERT (several heads, FFN wider than the width).
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Two sentence pairs of different lengths: padding and two segments."""
    enc = tokenizer(
        ["The quick brown fox jumps over the lazy dog.", "It rained."],
        ["A second segment follows the first one here.", "So we stayed inside and read all afternoon."],
        padding=True,
        return_tensors="pt",
    )
    assert (enc["attention_mask"] == 0).any() and (enc["token_type_ids"] == 1).any()
    return dict(enc)


def _scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights far from BERT's N(0, 0.02) init, so logits are O(1) and a wrong name or transpose cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                for name, p in module.named_parameters(recurse=False):
                    noise = torch.randn(p.shape, generator=g) * 0.1
                    p.copy_(1 + noise if isinstance(module, nn.LayerNorm) and name == "weight" else noise)
        for name, p in model.named_parameters():
            if name.endswith("predictions.bias") or name == "mlm.bias":  # a bare nn.Parameter, not in a module
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _student(vocab_size: int, num_labels: int = 0, seed: int = 0) -> Bert:
    torch.manual_seed(seed)
    return _scramble(Bert(BertConfig(vocab_size=vocab_size, num_labels=num_labels, **SMALL)), seed)


@contextmanager
def _transformers_warnings():
    """Collect what transformers logs at WARNING or above (its logger does not propagate to the root logger,
    so pytest's caplog would not see it)."""
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _assert_clean_load(cls, directory):
    with _transformers_warnings() as records:
        model, info = cls.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info.get("error_msgs")
    assert not records, [r.getMessage() for r in records]
    return model.eval()


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("num_labels", [2, 1], ids=["classifier", "regression"])
def test_exported_classifier_loads_in_transformers_with_same_logits(num_labels, tokenizer, batch, tmp_path):
    student = _student(len(tokenizer), num_labels)
    save_model(student, tmp_path, tokenizer)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert len(config["id2label"]) == num_labels

    hf = _assert_clean_load(AutoModelForSequenceClassification, tmp_path)
    assert type(hf).__name__ == "BertForSequenceClassification" and hf.config.num_labels == num_labels
    with torch.no_grad():
        ours = student(**batch).logits
        ref = hf(**batch).logits
    assert ours.shape == ref.shape == (2, num_labels)
    assert ours.abs().max() > 1e-2  # not a trivially tiny output that any mistake would also match
    assert _max_diff(ours, ref) <= 1e-5

    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf_tokenizer) == len(tokenizer) == config["vocab_size"]
    assert hf_tokenizer(["It rained."])["input_ids"] == tokenizer(["It rained."])["input_ids"]

    reloaded = load_model(tmp_path)
    assert reloaded.config.num_labels == num_labels and reloaded.config.is_regression == (num_labels == 1)
    expected, got = student.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_exported_encoder_loads_in_transformers_automodel(tokenizer, batch, tmp_path):
    student = _student(len(tokenizer))
    save_model(student, tmp_path, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    assert not any(k.startswith("bert.") for k in load_file(tmp_path / "model.safetensors"))

    hf = _assert_clean_load(AutoModel, tmp_path)
    assert type(hf).__name__ == "BertModel"
    with torch.no_grad():
        ours = student(**batch)
        ref = hf(**batch, output_hidden_states=True)
    assert len(ours.hidden_states) == len(ref.hidden_states) == SMALL["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        assert _max_diff(a, b) <= 1e-5, f"hidden state {i}"
    assert _max_diff(ours.hidden_states[-1], ref.last_hidden_state) <= 1e-5
    assert _max_diff(ours.pooled, ref.pooler_output) <= 1e-5

    reloaded = load_model(tmp_path)
    assert reloaded.classifier is None and reloaded.mlm is None
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_mlm_head_is_not_exported(tokenizer, tmp_path):
    torch.manual_seed(0)
    student = Bert(BertConfig(vocab_size=len(tokenizer), **SMALL), mlm_head=True)
    save_model(student, tmp_path, tokenizer)
    assert not any(k.startswith("cls.") for k in load_file(tmp_path / "model.safetensors"))
    _assert_clean_load(AutoModel, tmp_path)
    assert load_model(tmp_path).mlm is None


# ---------------------------------------------------------------------------------------------------- import


def _hf(cls, seed=0, **overrides):
    torch.manual_seed(seed)
    config = HFConfig(vocab_size=120, **SMALL, **overrides)
    return _scramble(cls(config), seed)


def _ids(vocab_size=120):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def test_sequence_classification_checkpoint_with_bert_prefix_loads(tmp_path):
    hf = _hf(BertForSequenceClassification, num_labels=3)
    hf.save_pretrained(tmp_path)
    assert any(k.startswith("bert.") for k in load_file(tmp_path / "model.safetensors"))
    ours = load_model(tmp_path).eval()
    assert ours.config.num_labels == 3 and ours.mlm is None
    with torch.no_grad():
        out, ref = ours(**_ids()).logits, hf(**_ids()).logits
    assert out.abs().max() > 1e-2
    assert _max_diff(out, ref) <= 1e-5


def test_pretraining_checkpoint_keeps_mlm_head_and_drops_nsp(tmp_path):
    hf = _hf(BertForPreTraining)
    hf.save_pretrained(tmp_path)
    assert any(k.startswith("cls.seq_relationship") for k in load_file(tmp_path / "model.safetensors"))
    ours = load_model(tmp_path).eval()
    assert ours.mlm is not None and ours.classifier is None
    assert not any("seq_relationship" in k for k in ours.state_dict())
    with torch.no_grad():
        out = ours(**_ids())
        ref = hf(**_ids())
        pooled = hf.bert(**_ids()).pooler_output
        scores = ours.mlm_logits(out.hidden_states[-1])
    assert scores.shape == ref.prediction_logits.shape == (2, 12, 120)
    assert _max_diff(scores, ref.prediction_logits) <= 1e-5
    assert _max_diff(out.pooled, pooled) <= 1e-5


def test_masked_lm_checkpoint_without_pooler_loads(tmp_path):
    # BertForMaskedLM has no pooler: the pooler keeps BERT's initialisation (as in transformers), with a warning.
    hf = _hf(BertForMaskedLM)
    hf.save_pretrained(tmp_path)
    assert not any("pooler" in k for k in load_file(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="pooler"):
        ours = load_model(tmp_path).eval()
    assert ours.mlm is not None
    with torch.no_grad():
        out = ours(**_ids())
        ref = hf(**_ids(), output_hidden_states=True)
        scores = ours.mlm_logits(out.hidden_states[-1])
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert _max_diff(a, b) <= 1e-5
    assert _max_diff(scores, ref.logits) <= 1e-5


def test_pytorch_model_bin_checkpoint_loads(tmp_path):
    # transformers 5 always writes safetensors (safe_serialization is gone), so write the .bin as older versions did.
    hf = _hf(BertForSequenceClassification, num_labels=2)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_model(tmp_path).eval()
    with torch.no_grad():
        assert _max_diff(ours(**_ids()).logits, hf(**_ids()).logits) <= 1e-5


# ---------------------------------------------------------------------------------------------------- init from teacher


def test_init_from_teacher_copies_the_chosen_layers(minilm_dir):
    teacher = load_model(minilm_dir)
    student = init_from_teacher(teacher, [2, 4, 6])
    assert student.config.num_hidden_layers == 3
    assert student.config.hidden_size == teacher.config.hidden_size and student.classifier is None
    for j, i in enumerate([2, 4, 6]):
        expected, got = teacher.layers[i - 1].state_dict(), student.layers[j].state_dict()
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), f"student layer {j} {name}"
    for part in ("embeddings", "pooler"):
        expected, got = getattr(teacher, part).state_dict(), getattr(student, part).state_dict()
        for name in expected:
            assert torch.equal(expected[name], got[name]), f"{part}.{name}"
    # A copy, not a view: training the student must not change the teacher.
    with torch.no_grad():
        student.layers[0].up.weight.add_(1)
    assert not torch.equal(student.layers[0].up.weight, teacher.layers[1].up.weight)


@pytest.mark.parametrize("layers", [[], [0, 2], [2, 7], [4, 2], [2, 2, 4]])
def test_init_from_teacher_rejects_bad_layer_lists(layers):
    teacher = Bert(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                              intermediate_size=32))
    with pytest.raises(CheckpointError, match="between 1 and 6"):
        init_from_teacher(teacher, layers)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def small_dir(tmp_path, tokenizer):
    """A valid exported encoder (MiniLM tokenizer) that each test then breaks in one way."""
    directory = tmp_path / "model"
    save_model(_student(len(tokenizer)), directory)
    return directory


def test_directory_without_config_json(small_dir):
    (small_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json") as e:
        load_model(small_dir)
    assert str(small_dir) in str(e.value)


def test_non_bert_model_type(small_dir):
    config = json.loads((small_dir / "config.json").read_text())
    (small_dir / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(CheckpointError, match="'roberta'") as e:
        load_model(small_dir)
    assert str(small_dir / "config.json") in str(e.value)


def test_config_that_does_not_match_the_weights(small_dir):
    config = json.loads((small_dir / "config.json").read_text())
    (small_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.0\.intermediate\.dense\.(weight|bias) has shape") as e:
        load_model(small_dir)
    assert str(small_dir) in str(e.value) and "(100" in str(e.value)


def test_weight_of_the_wrong_shape(small_dir):
    weights = load_file(small_dir / "model.safetensors")
    weights["pooler.dense.weight"] = torch.zeros(64, 63)
    save_file(weights, small_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"pooler\.dense\.weight has shape \(64, 63\)") as e:
        load_model(small_dir)
    assert str(small_dir) in str(e.value)


def test_missing_and_unexpected_weights_are_named(small_dir):
    weights = load_file(small_dir / "model.safetensors")
    del weights["encoder.layer.1.output.LayerNorm.bias"]
    weights["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    save_file(weights, small_dir / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(small_dir)
    message = str(e.value)
    assert str(small_dir) in message
    assert "missing encoder.layer.1.output.LayerNorm.bias" in message
    assert "unexpected encoder.layer.0.attention.self.rotary.weight" in message


def test_extra_layer_in_weights_is_unexpected(small_dir):
    config = json.loads((small_dir / "config.json").read_text())
    (small_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"unexpected encoder\.layer\.1\.") as e:
        load_model(small_dir)
    assert "missing" not in str(e.value)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_safetensors(small_dir):
    _truncate(small_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(small_dir)
    assert str(small_dir / "model.safetensors") in str(e.value)


def test_truncated_pytorch_model_bin(small_dir):
    weights = load_file(small_dir / "model.safetensors")
    (small_dir / "model.safetensors").unlink()
    torch.save(weights, small_dir / "pytorch_model.bin")
    assert load_model(small_dir).config.num_hidden_layers == 2  # the intact .bin loads
    _truncate(small_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(small_dir)
    assert str(small_dir / "pytorch_model.bin") in str(e.value)


def test_directory_without_weights(small_dir):
    (small_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin") as e:
        load_model(small_dir)
    assert str(small_dir) in str(e.value)


def test_tokenizer_vocab_size_mismatch(minilm_dir):
    with pytest.raises(CheckpointError, match="30522 tokens but the model's vocab_size is 1000") as e:
        load_tokenizer(minilm_dir, vocab_size=1000)
    assert str(minilm_dir) in str(e.value)
    assert len(load_tokenizer(minilm_dir, vocab_size=30522)) == 30522


def test_not_a_directory_nor_a_preset(tmp_path):
    with pytest.raises(CheckpointError, match="neither a preset"):
        load_model(tmp_path / "nowhere")
