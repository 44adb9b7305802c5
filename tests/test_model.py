"""tinybert.model against transformers' own BertModel: real MiniLM weights and random weights of real BERT shapes."""

import pytest
import torch
from transformers import AutoTokenizer
from transformers import BertConfig as HFConfig
from transformers import BertModel as HFBert

from tinybert.checkpoint import load_model
from tinybert.model import PRESETS, Bert, BertConfig


def _batch(tokenizer):
    """Two sentence pairs of different lengths: padding and two segments."""
    return tokenizer(
        ["The quick brown fox jumps over the lazy dog.", "It rained."],
        ["A second segment follows the first one here.", "So we stayed inside and read all afternoon."],
        padding=True,
        return_tensors="pt",
    )


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    ours = load_model(minilm_dir).eval()
    hf = HFBert.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    return tokenizer, ours, hf


def test_minilm_hidden_states_and_attention_match_transformers(minilm):
    tokenizer, ours, hf = minilm
    enc = _batch(tokenizer)
    assert (enc["attention_mask"] == 0).any() and (enc["token_type_ids"] == 1).any()
    layers = range(1, ours.config.num_hidden_layers + 1)
    with torch.no_grad():
        out = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], score_layers=layers)
        ref = hf(**enc, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 7
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert (a - b).abs().max() <= 1e-5, f"hidden state {i}"
    keep = enc["attention_mask"].bool()[:, None, None, :]
    for i in layers:
        probs = (out.attention_scores[i] + (~keep) * torch.finfo(torch.float32).min).softmax(-1)
        assert (probs - ref.attentions[i - 1]).abs().max() <= 1e-5, f"attention of layer {i}"
    assert (out.pooled - ref.pooler_output).abs().max() <= 1e-5


def test_scores_are_pre_softmax_and_unmasked(minilm):
    tokenizer, ours, _ = minilm
    enc = _batch(tokenizer)
    with torch.no_grad():
        out = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], score_layers=[2])
    assert list(out.attention_scores) == [2]
    scores = out.attention_scores[2]
    assert scores.shape == (2, 12, enc["input_ids"].shape[1], enc["input_ids"].shape[1])
    # QK^T/sqrt(d) by hand from layer 2's input, on padded keys too (the mask is not added).
    attn, x = ours.layers[1].attn, out.hidden_states[1]
    q = attn.q(x).view(2, -1, 12, 32).transpose(1, 2)
    k = attn.k(x).view(2, -1, 12, 32).transpose(1, 2)
    torch.testing.assert_close(scores, q @ k.transpose(-1, -2) / 32**0.5, rtol=1e-5, atol=1e-5)
    assert scores.min() > -1e2  # nothing like a -10000 mask in there


def test_fused_path_equals_explicit_path(minilm):
    tokenizer, ours, _ = minilm
    enc = _batch(tokenizer)
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        fused = ours(**enc)
        explicit = ours(**enc, score_layers=range(1, 7))
    for a, b in zip(fused.hidden_states, explicit.hidden_states):
        assert (a - b)[real].abs().max() <= 1e-5
    assert fused.attention_scores == {}


def test_queries_keys_values_of_asked_layers_match_transformers(minilm):
    """MiniLM's relation losses read a layer's q, k, v (B, T, H): only the asked layers return them, they are
    transformers' own projections of that layer's input, and asking changes nothing else (the fused path stays)."""
    tokenizer, ours, hf = minilm
    enc = _batch(tokenizer)
    with torch.no_grad():
        plain = ours(**enc)
        out = ours(**enc, qkv_layers=[2, 6])
        ref = hf(**enc, output_hidden_states=True)
    assert sorted(out.qkv) == [2, 6] and plain.qkv == {} and out.attention_scores == {}
    for a, b in zip(plain.hidden_states, out.hidden_states):
        assert torch.equal(a, b)
    for i in (2, 6):
        self_attention = hf.encoder.layer[i - 1].attention.self
        x = ref.hidden_states[i - 1]
        expected = (self_attention.query(x), self_attention.key(x), self_attention.value(x))
        for name, got, want in zip("qkv", out.qkv[i], expected):
            assert got.shape == (2, enc["input_ids"].shape[1], 384)
            assert (got - want).abs().max() <= 1e-5, f"{name} of layer {i}"


def test_num_layers_stops_early(minilm):
    tokenizer, ours, _ = minilm
    enc = _batch(tokenizer)
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(ours.layers)]
    with torch.no_grad():
        out = ours(**enc, num_layers=3, score_layers=[3])
    for h in hooks:
        h.remove()
    assert calls == [0, 1, 2] and len(out.hidden_states) == 4
    assert out.pooled is None and out.logits is None and list(out.attention_scores) == [3]


SHAPES = {
    "bert-base": dict(),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "multilingual": dict(vocab_size=119547),
    "chinese": dict(vocab_size=21128),
}


@pytest.mark.parametrize("name", SHAPES)
def test_random_weight_parity_with_checkpoints_saved_by_transformers(name, tmp_path):
    torch.manual_seed(0)
    hf = HFBert(HFConfig(**SHAPES[name], attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    V = SHAPES[name].get("vocab_size", 30522)
    ids = torch.randint(1, V, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    with torch.no_grad():
        out = ours(ids, mask, types, score_layers=[1, hf.config.num_hidden_layers])
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True,
                 output_attentions=True)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert (a - b).abs().max() <= 1e-5
    keep = mask.bool()[:, None, None, :]
    for i, scores in out.attention_scores.items():
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        assert (probs - ref.attentions[i - 1]).abs().max() <= 1e-5


def test_presets_have_the_papers_sizes():
    counts = {name: Bert(config).num_parameters()["total"] for name, config in PRESETS.items()}
    assert round(counts["bert-base"] / 1e6) == 109  # HF BertModel bert-base-uncased: 109.5M
    assert round(counts["tinybert-4l-312d"] / 1e6, 1) == 14.4  # paper: 14.5M, counted with its fit_dense
    assert round(counts["tinybert-6l-768d"] / 1e6) == 67
    with pytest.raises(ValueError, match="unknown preset 'tiny'"):
        BertConfig.preset("tiny")


def test_classifier_head_and_regression_head():
    torch.manual_seed(0)
    model = Bert(BertConfig.preset("tinybert-4l-312d", num_labels=3)).eval()
    ids = torch.randint(0, 30522, (4, 10))
    out = model(ids)
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.logits, model.classifier(out.pooled))
    assert Bert(BertConfig(num_hidden_layers=1, num_labels=1)).config.is_regression


def test_bf16_autocast_stays_close_to_fp32(minilm):
    tokenizer, ours, _ = minilm
    enc = _batch(tokenizer)
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = ours(**enc).hidden_states[-1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(**enc, score_layers=[6])
    low = out.hidden_states[-1]
    assert out.attention_scores[6].dtype == torch.bfloat16  # the matmuls ran in bf16 (LayerNorm stays fp32)
    rel = (low.float() - ref)[real].norm() / ref[real].norm()
    assert rel < 3e-2
