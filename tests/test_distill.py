"""Distiller: a frozen, unregistered teacher; the right terms; the teacher does no more work than needed."""

import copy

import pytest
import torch

from tinybert.distill import Distiller, Projections
from tinybert.losses import LayerMapError, attention_mse, hidden_mse, soft_cross_entropy
from tinybert.model import Bert, BertConfig

TEACHER = BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=32, num_labels=3,
)
STUDENT = TEACHER.replace(hidden_size=16, num_hidden_layers=2, intermediate_size=32)
ALL_TERMS = ("embedding", "hidden", "attention", "prediction")


def make_batch(B=3, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return {
        "input_ids": torch.randint(1, TEACHER.vocab_size, (B, T), generator=g) * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros(B, T, dtype=torch.long),
        "labels": torch.tensor([0, 2, 1]),
    }


def make_distiller(layer_map="uniform", student_config=STUDENT, **kwargs):
    torch.manual_seed(0)
    return Distiller(Bert(TEACHER), Bert(student_config), layer_map, **kwargs)


def record_teacher_layers(distiller):
    """Hook every teacher layer; returns a list that collects (1-based layer, asked for scores) per call."""
    calls = []
    for i, layer in enumerate(distiller.teacher.layers, start=1):
        layer.register_forward_hook(lambda module, args, out, i=i: calls.append((i, args[2])))
    return calls


def test_teacher_is_not_registered():
    distiller = make_distiller(terms=ALL_TERMS)
    teacher_params = {id(p) for p in distiller.teacher.parameters()}
    assert not teacher_params & {id(p) for p in distiller.parameters()}
    assert all(k.startswith(("student.", "projections.")) for k in distiller.state_dict())
    assert all(not p.requires_grad for p in distiller.teacher.parameters())


def test_teacher_stays_eval_and_gets_no_grad():
    distiller = make_distiller(terms=ALL_TERMS).train()
    assert distiller.student.training and not distiller.teacher.training
    assert not any(m.training for m in distiller.teacher.modules())
    terms = distiller(make_batch())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    distiller.eval().train()
    assert not distiller.teacher.training


def test_gradients_reach_student_and_projections():
    distiller = make_distiller(terms=ALL_TERMS).train()
    sum(distiller(make_batch()).values()).backward()
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert len(list(distiller.projections.parameters())) == 2 * 3  # one Linear per mapped state: 0, 1, 2


def test_only_requested_terms_are_returned():
    batch = make_batch()
    for terms in [("hidden",), ("attention",), ("embedding", "prediction"), ALL_TERMS]:
        assert set(make_distiller(terms=terms)(batch)) == set(terms)
    with pytest.raises(ValueError, match="loss terms"):
        make_distiller(terms=("hidden", "logits"))


def test_terms_are_zero_when_student_is_the_teacher():
    torch.manual_seed(0)
    teacher = Bert(TEACHER)
    batch = make_batch()
    for attention_mode in ("masked", "original"):
        distiller = Distiller(
            teacher, copy.deepcopy(teacher), "uniform", terms=ALL_TERMS, prediction="mse_teacher",
            attention_mode=attention_mode,
        ).eval()  # eval: no dropout in the student either
        assert distiller.layer_map == [0, 1, 2, 3, 4]
        assert len(list(distiller.projections.parameters())) == 0  # same width: identity
        terms = distiller(batch)
        assert {k: v.item() for k, v in terms.items()} == {k: 0.0 for k in ALL_TERMS}
    # Soft cross-entropy is not 0 at equality (it is the teacher's entropy) but is at its minimum: no gradient.
    student = copy.deepcopy(teacher).requires_grad_(True)  # the copy inherits the frozen teacher's flags
    distiller = Distiller(teacher, student, "uniform", terms=("prediction",)).eval()
    distiller(batch)["prediction"].backward()
    assert max(p.grad.abs().max().item() for p in distiller.student.parameters() if p.grad is not None) < 1e-6


def test_terms_match_the_loss_functions():
    distiller = make_distiller([0, 1, 3], terms=ALL_TERMS, shared_projection=True).eval()
    batch = make_batch()
    terms = distiller(batch)
    s = distiller.student(batch["input_ids"], batch["attention_mask"], score_layers=(1, 2))
    t = distiller.teacher(batch["input_ids"], batch["attention_mask"], score_layers=(1, 3))
    fit = distiller.projections.fit_dense
    expected = {
        "embedding": hidden_mse(fit(s.hidden_states[0]), t.hidden_states[0]),
        "hidden": hidden_mse(fit(s.hidden_states[1]), t.hidden_states[1])
        + hidden_mse(fit(s.hidden_states[2]), t.hidden_states[3]),
        "attention": attention_mse(s.attention_scores[1], t.attention_scores[1], batch["attention_mask"])
        + attention_mse(s.attention_scores[2], t.attention_scores[3], batch["attention_mask"]),
        "prediction": soft_cross_entropy(s.logits, t.logits),
    }
    for name, value in expected.items():
        assert torch.allclose(terms[name], value, atol=1e-6), name


def test_teacher_runs_only_mapped_layers():
    batch = make_batch()
    # Map [0, 1, 3]: layer 4 never runs; explicit scores only on layers 1 and 3.
    distiller = make_distiller([0, 1, 3], terms=("hidden", "attention"))
    calls = record_teacher_layers(distiller)
    distiller(batch)
    assert calls == [(1, True), (2, False), (3, True)]
    # Hidden states only: no explicit scores anywhere.
    distiller = make_distiller([0, 1, 2], terms=("embedding", "hidden"))
    calls = record_teacher_layers(distiller)
    distiller(batch)
    assert calls == [(1, False), (2, False)]
    # Embeddings only: no layer at all.
    distiller = make_distiller([0, 1, 2], terms=("embedding",))
    calls = record_teacher_layers(distiller)
    distiller(batch)
    assert calls == []
    # Soft targets need the teacher's logits: every layer runs.
    distiller = make_distiller([0, 1, 2], terms=("attention", "prediction"))
    calls = record_teacher_layers(distiller)
    distiller(batch)
    assert calls == [(1, True), (2, True), (3, False), (4, False)]


def test_precomputed_teacher_logits_skip_the_teacher():
    distiller = make_distiller(terms=("prediction",), temperature=2.0).eval()
    calls = record_teacher_layers(distiller)
    batch = {**make_batch(), "teacher_logits": torch.randn(3, 3)}
    terms = distiller(batch)
    assert calls == []
    student_logits = distiller.student(batch["input_ids"], batch["attention_mask"]).logits
    assert torch.allclose(terms["prediction"], soft_cross_entropy(student_logits, batch["teacher_logits"], 2.0))


def test_gold_label_predictions():
    batch = make_batch()
    hard = make_distiller(terms=("prediction",), prediction="hard")
    calls = record_teacher_layers(hard)
    assert hard(batch)["prediction"] > 0 and calls == []  # the teacher is not needed for gold labels
    sts = STUDENT.replace(num_labels=1, problem_type="regression")
    regression = make_distiller(student_config=sts, terms=("prediction",), prediction="mse")
    assert regression({**batch, "labels": torch.tensor([0.5, 4.0, 2.5])})["prediction"] > 0


def test_configuration_errors():
    with pytest.raises(LayerMapError, match="heads"):
        make_distiller(student_config=STUDENT.replace(num_attention_heads=2), terms=("attention",))
    make_distiller(student_config=STUDENT.replace(num_attention_heads=2), terms=("hidden",))  # fine without attention
    with pytest.raises(LayerMapError, match="explicit list"):
        make_distiller(student_config=STUDENT.replace(num_hidden_layers=3))
    with pytest.raises(ValueError, match="prediction"):
        make_distiller(terms=("prediction",), prediction="kl")
    with pytest.raises(ValueError, match="attention_mode"):
        make_distiller(attention_mode="hf")
    with pytest.raises(ValueError, match="head"):
        make_distiller(student_config=STUDENT.replace(num_labels=0), terms=("prediction",))


def test_projections():
    assert len(list(Projections(16, 32, 3, shared=True).parameters())) == 2
    assert len(list(Projections(16, 32, 3, shared=False).parameters())) == 6
    assert len(list(Projections(32, 32, 3).parameters())) == 0
    h = torch.randn(2, 5, 16)
    assert Projections(16, 32, 3)(2, h).shape == (2, 5, 32)


def test_terms_fp32_under_bf16_autocast():
    distiller = make_distiller(terms=ALL_TERMS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = distiller(make_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


# ---- MiniLM relation terms ----

V1 = ("attention_relation", "value_relation")
V2 = ("q_relation", "k_relation", "v_relation")
# A student of another depth (3, not a divisor of 4), width (24) and head count (2): fine for the v2 terms.
ODD = TEACHER.replace(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48)


def projections_by_hand(model, hidden_states, layer):
    """(q, k, v) of a 1-based layer, each (B, T, H), from that layer's input and its Linear weights."""
    attn, x = model.layers[layer - 1].attn, hidden_states[layer - 1]
    return attn.q(x), attn.k(x), attn.v(x)


def test_relation_terms_match_the_loss_functions():
    from tinybert.losses import attention_kl, relation_kl

    batch, mask = make_batch(), make_batch()["attention_mask"]
    # v2 into the odd student: the teacher's layer 3 teaches the student's last layer (3), 4 relation heads.
    distiller = make_distiller(student_config=ODD, terms=V2, relation_heads=4, teacher_layer=3).eval()
    terms = distiller(batch)
    s = distiller.student(batch["input_ids"], mask)
    t = distiller.teacher(batch["input_ids"], mask)
    sq, tq = projections_by_hand(distiller.student, s.hidden_states, 3), projections_by_hand(
        distiller.teacher, t.hidden_states, 3)
    for i, name in enumerate(V2):
        assert torch.allclose(terms[name], relation_kl(sq[i], tq[i], mask, 4), atol=1e-6), name
        assert terms[name] > 0
    # v1 on every layer pair of the map (teacher_layer: map), beside TinyBERT's attention term.
    distiller = make_distiller([0, 2, 4], terms=("attention", *V1), teacher_layer="map").eval()
    terms = distiller(batch)
    s = distiller.student(batch["input_ids"], mask, score_layers=(1, 2))
    t = distiller.teacher(batch["input_ids"], mask, score_layers=(2, 4))
    expected_att = sum(attention_kl(s.attention_scores[j], t.attention_scores[m], mask) for j, m in ((1, 2), (2, 4)))
    expected_val = sum(relation_kl(projections_by_hand(distiller.student, s.hidden_states, j)[2],
                                   projections_by_hand(distiller.teacher, t.hidden_states, m)[2], mask, 4)
                       for j, m in ((1, 2), (2, 4)))
    assert torch.allclose(terms["attention_relation"], expected_att, atol=1e-6)
    assert torch.allclose(terms["value_relation"], expected_val, atol=1e-6)
    assert set(terms) == {"attention", *V1}


def test_relation_terms_zero_when_student_is_the_teacher():
    torch.manual_seed(0)
    teacher = Bert(TEACHER)
    for teacher_layer in (None, "map"):
        distiller = Distiller(teacher, copy.deepcopy(teacher), "uniform", terms=(*V1, *V2), relation_heads=8,
                              teacher_layer=teacher_layer).eval()
        assert {k: v.item() for k, v in distiller(make_batch()).items()} == {k: 0.0 for k in (*V1, *V2)}


def test_relation_terms_need_no_layer_map_and_teach_the_last_layer():
    batch = make_batch()
    # 4 -> 3 layers has no uniform map: the v2 terms do not need one.
    distiller = make_distiller(student_config=ODD, terms=V2, relation_heads=8).train()
    assert distiller.layer_map is None and distiller.relation_layers == [(3, 4)]
    assert len(list(distiller.projections.parameters())) == 0  # nothing to project: not a parameter to waste
    calls = record_teacher_layers(distiller)
    sum(distiller(batch).values()).backward()
    assert calls == [(1, False), (2, False), (3, False), (4, False)]  # q/k/v kept, fused attention all the way
    # Gradients reach the last layer's attention and everything below it, not the layer's FFN output path only.
    student = distiller.student
    assert student.layers[2].attn.q.weight.grad.abs().sum() > 0 and student.layers[0].up.weight.grad.abs().sum() > 0
    assert student.layers[2].attn.out.weight.grad is None  # the attention output comes after q, k, v
    # An upper-middle teacher layer: the teacher stops there; attention_relation asks for its scores only.
    distiller = make_distiller(student_config=ODD.replace(num_attention_heads=4), terms=("attention_relation",),
                               teacher_layer=2)
    calls = record_teacher_layers(distiller)
    distiller(batch)
    assert calls == [(1, False), (2, True)]


def test_relation_configuration_errors():
    with pytest.raises(LayerMapError, match="recipe terms attention_relation, value_relation \\(MiniLM\\) compare "
                                            "teacher and student head by head, but the teacher has 4 heads and the "
                                            "student 2; give the student 4 heads"):
        make_distiller(student_config=ODD, terms=V1)
    with pytest.raises(ValueError, match="recipe key relation_heads: 16 does not divide both the teacher's width 32 "
                                         "and the student's 24; use a common divisor, e.g. 8"):
        make_distiller(student_config=ODD, terms=V2, relation_heads=16)
    with pytest.raises(LayerMapError, match="recipe key teacher_layer: 5 is not a layer of the 4-layer teacher"):
        make_distiller(student_config=ODD, terms=V2, relation_heads=8, teacher_layer=5)
    with pytest.raises(LayerMapError, match="explicit list"):  # teacher_layer map needs a map, 4 -> 3 has none
        make_distiller(student_config=ODD, terms=V2, relation_heads=8, teacher_layer="map")
    make_distiller(student_config=ODD, terms=("hidden", *V2), layer_map=[0, 1, 3, 4], relation_heads=8)


def test_relation_terms_fp32_under_bf16_autocast():
    distiller = make_distiller(student_config=ODD, terms=V2, relation_heads=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = distiller(make_batch())
    assert set(terms) == set(V2)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


def test_describe_relations_says_which_layers_and_why_heads_are_checked():
    assert make_distiller(terms=("hidden",)).describe_relations() == []
    v1 = make_distiller([0, 2, 4], terms=("hidden", "attention_relation", "q_relation"), relation_heads=8,
                        teacher_layer="map")
    assert v1.describe_relations() == [
        "relation terms (MiniLM; teacher_layer map: student layer j <- teacher layer layer_map[j]):",
        "  attention_relation: student layer 1 <- layer 2, layer 2 <- layer 4; head counts must match, and do: "
        "4 heads in both (v1 compares attention heads one to one)",
        "  q_relation: student layer 1 <- layer 2, layer 2 <- layer 4; no head-count check: 8 relation heads split "
        "each width (d_r 4 teacher, 2 student), whatever the attention heads (4 teacher, 4 student)",
    ]
    last = make_distiller(student_config=ODD, terms=V2, relation_heads=8)
    assert last.describe_relations()[0] == ("relation terms (MiniLM; teacher_layer null: the teacher's last layer "
                                            "teaches the student's last):")
    assert last.describe_relations()[1].startswith("  q_relation: student layer 3 <- layer 4; no head-count check")
