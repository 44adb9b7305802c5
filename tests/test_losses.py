"""Losses and layer maps: hand-computed values, parity with the original code's formulas, edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from tinybert.losses import (
    LayerMapError,
    attention_kl,
    attention_mse,
    check_relation_heads,
    hard_cross_entropy,
    hidden_mse,
    regression_mse,
    relation_kl,
    relation_layer_pairs,
    resolve_layer_map,
    soft_cross_entropy,
    uniform_layer_map,
)

# ---- the original code's formulas, written out literally (task_distill.py / modeling.py) ----


def original_attention_loss(student_att, teacher_att, attention_mask):
    # modeling.py adds the extended mask to the scores; task_distill.py then zeroes entries <= -1e2 and takes MSELoss.
    extended = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    student_att, teacher_att = student_att + extended, teacher_att + extended
    student_att = torch.where(student_att <= -1e2, torch.zeros_like(student_att), student_att)
    teacher_att = torch.where(teacher_att <= -1e2, torch.zeros_like(teacher_att), teacher_att)
    return torch.nn.MSELoss()(student_att, teacher_att)


def original_soft_cross_entropy(predicts, targets):
    student_likelihood = torch.nn.functional.log_softmax(predicts, dim=-1)
    targets_prob = torch.nn.functional.softmax(targets, dim=-1)
    return (-targets_prob * student_likelihood).mean()


def padded_batch(B=3, nh=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, nh, T, T, generator=g) * 3, torch.randn(B, nh, T, T, generator=g) * 3
    mask = torch.ones(B, T)
    mask[1, 5:] = 0  # two padded positions
    mask[2, 3:] = 0  # four padded positions
    return s, t, mask


# ---- layer maps ----


@pytest.mark.parametrize(
    "n, m, expected",
    [(12, 4, [0, 3, 6, 9, 12]), (12, 6, [0, 2, 4, 6, 8, 10, 12]), (6, 3, [0, 2, 4, 6]), (4, 4, [0, 1, 2, 3, 4])],
)
def test_uniform_layer_map(n, m, expected):
    assert uniform_layer_map(n, m) == expected
    assert resolve_layer_map("uniform", n, m) == expected


def test_uniform_layer_map_non_divisible_suggests_a_list():
    with pytest.raises(LayerMapError, match="explicit list") as err:
        uniform_layer_map(12, 5)
    assert isinstance(err.value, ValueError)
    with pytest.raises(LayerMapError):
        resolve_layer_map("uniform", 12, 5)


@pytest.mark.parametrize("spec", [[0, 3, 6, 9, 12], [0, 9, 10, 11, 12], [0, 1, 2, 3, 4], (0, 2, 5, 8, 11)])
def test_explicit_maps_accepted(spec):
    assert resolve_layer_map(spec, 12, 4, teacher_heads=12, student_heads=12) == list(spec)


@pytest.mark.parametrize(
    "spec, match",
    [
        ([0, 3, 6, 12], "entries"),  # wrong length
        ([0, 3, 6, 9, 12, 12], "entries"),
        ([1, 3, 6, 9, 12], "start at 0"),
        ([0, 6, 3, 9, 12], "increasing"),
        ([0, 3, 3, 9, 12], "increasing"),
        ([0, 3, 6, 9, 13], "beyond the teacher"),
        ([0, 3.0, 6, 9, 12], "integers"),
        ("top", "unknown"),
    ],
)
def test_invalid_maps_raise(spec, match):
    with pytest.raises(LayerMapError, match=match):
        resolve_layer_map(spec, 12, 4)


def test_head_mismatch_raises_only_with_attention():
    with pytest.raises(LayerMapError, match="heads"):
        resolve_layer_map("uniform", 12, 4, teacher_heads=12, student_heads=4)
    assert resolve_layer_map("uniform", 12, 4, teacher_heads=12, student_heads=4, attention=False) == [0, 3, 6, 9, 12]


# ---- hand-computed values ----


def test_attention_mse_by_hand():
    # 1x1x2x2, both tokens real: differences 1, 0, 2, 3 -> squares 1, 0, 4, 9 -> mean 14/4 = 3.5 in both modes.
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.tensor([[[[0.0, 2.0], [1.0, 1.0]]]])
    mask = torch.tensor([[1, 1]])
    assert attention_mse(s, t, mask).item() == pytest.approx(3.5)
    assert attention_mse(s, t, mask, mode="original").item() == pytest.approx(3.5)
    # Second token padded, teacher [[0, 5], [1, 7]].
    # original: -10000 on key column 1 -> zeroed in both -> s [[1, 0], [3, 0]], t [[0, 0], [1, 0]]
    #           -> squares 1, 0, 4, 0 -> mean over 4 cells = 1.25.
    # masked: only the (query 0, key 0) pair is real -> (1 - 0)^2 = 1.
    t = torch.tensor([[[[0.0, 5.0], [1.0, 7.0]]]])
    mask = torch.tensor([[1, 0]])
    assert attention_mse(s, t, mask, mode="original").item() == pytest.approx(1.25)
    assert attention_mse(s, t, mask, mode="masked").item() == pytest.approx(1.0)


def test_hidden_mse_by_hand():
    # (1, 1, 2): differences 1, 2 -> (1 + 4) / 2 = 2.5
    assert hidden_mse(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.0, 0.0]]])).item() == pytest.approx(2.5)


def test_soft_cross_entropy_by_hand():
    # student [0, 0] -> log_softmax [-ln2, -ln2]; teacher [0, ln3] -> softmax [1/4, 3/4].
    # Cells -q*log p = [ln2/4, 3ln2/4]: "original" means over the 2 cells = ln2/2; "batchmean" sums them = ln2.
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3)]])
    assert soft_cross_entropy(s, t).item() == pytest.approx(math.log(2) / 2)
    assert soft_cross_entropy(s, t, mode="batchmean").item() == pytest.approx(math.log(2))
    # T = 2 with teacher [0, 2 ln3]: same distributions; "original" has no T^2, "batchmean" multiplies by 4.
    t2 = torch.tensor([[0.0, 2 * math.log(3)]])
    assert soft_cross_entropy(s, t2, temperature=2.0).item() == pytest.approx(math.log(2) / 2)
    assert soft_cross_entropy(s, t2, temperature=2.0, mode="batchmean").item() == pytest.approx(4 * math.log(2))


def test_regression_mse_by_hand():
    # (1 - 0)^2 = 1, (2 - 4)^2 = 4 -> mean 2.5, whether predictions are (B,) or (B, 1)
    assert regression_mse(torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 4.0])).item() == pytest.approx(2.5)
    assert regression_mse(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item() == pytest.approx(2.5)


def test_hard_cross_entropy_by_hand():
    # logits [0, ln3] -> probs [1/4, 3/4]: label 1 -> ln(4/3), label 0 -> ln 4; mean = (ln(4/3) + ln4) / 2
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    expected = (math.log(4 / 3) + math.log(4)) / 2
    assert hard_cross_entropy(logits, torch.tensor([1, 0])).item() == pytest.approx(expected)


# ---- parity with the original code ----


def test_attention_original_mode_matches_original_code():
    s, t, mask = padded_batch()
    ours = attention_mse(s, t, mask, mode="original")
    assert torch.allclose(ours, original_attention_loss(s, t, mask), atol=1e-6, rtol=0)


def test_soft_cross_entropy_original_mode_matches_original_code():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 3, generator=g) * 2, torch.randn(8, 3, generator=g) * 2
    for T in (1.0, 2.0):
        expected = original_soft_cross_entropy(s / T, t / T)
        assert torch.allclose(soft_cross_entropy(s, t, temperature=T), expected, atol=1e-6, rtol=0)


def test_masked_attention_equals_mean_over_real_pairs():
    s, t, mask = padded_batch()
    diffs = [
        (s[b, :, :n, :n] - t[b, :, :n, :n]).pow(2).flatten() for b, n in enumerate(mask.sum(-1).long().tolist())
    ]
    assert torch.allclose(attention_mse(s, t, mask), torch.cat(diffs).mean(), atol=1e-6, rtol=1e-6)


# ---- invariances ----


def test_masked_attention_unchanged_by_extra_padding():
    s, t, mask = padded_batch()
    B, nh, T, _ = s.shape
    pad = 5
    s2, t2 = torch.randn(B, nh, T + pad, T + pad) * 50, torch.randn(B, nh, T + pad, T + pad) * 50  # junk in padding
    s2[..., :T, :T], t2[..., :T, :T] = s, t
    mask2 = torch.cat([mask, torch.zeros(B, pad)], dim=1)
    assert torch.allclose(attention_mse(s2, t2, mask2), attention_mse(s, t, mask), atol=1e-6, rtol=1e-6)
    # The original's value does depend on padding: that is the departure the masked mode fixes.
    assert not torch.allclose(attention_mse(s2, t2, mask2, "original"), attention_mse(s, t, mask, "original"))


def test_losses_zero_when_student_equals_teacher():
    s, _, mask = padded_batch()
    assert attention_mse(s, s.clone(), mask).item() == 0
    assert attention_mse(s, s.clone(), mask, mode="original").item() == 0
    h = torch.randn(2, 5, 8)
    assert hidden_mse(h, h.clone()).item() == 0
    y = torch.randn(4)
    assert regression_mse(y[:, None], y).item() == 0


def test_soft_cross_entropy_minimal_when_student_equals_teacher():
    # A cross-entropy, not a KL: at equality it is the teacher's entropy (not 0) and its gradient vanishes.
    t = torch.randn(4, 3)
    s = t.clone().requires_grad_(True)
    loss = soft_cross_entropy(s, t, mode="batchmean")
    q = t.softmax(-1)
    assert loss.item() == pytest.approx(-(q * q.log()).sum(-1).mean().item(), abs=1e-6)
    loss.backward()
    assert s.grad.abs().max().item() < 1e-7


def test_losses_fp32_under_bf16_autocast():
    s, t, mask = padded_batch()
    s16, t16 = s.bfloat16(), t.bfloat16()
    h, ht = torch.randn(2, 5, 8).bfloat16(), torch.randn(2, 5, 8).bfloat16()
    logits, targets = torch.randn(4, 3).bfloat16(), torch.randn(4, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = {
            "masked": (attention_mse(s16, t16, mask), attention_mse(s16.float(), t16.float(), mask)),
            "original": (
                attention_mse(s16, t16, mask, "original"),
                original_attention_loss(s16.float(), t16.float(), mask),
            ),
            "hidden": (hidden_mse(h, ht), F.mse_loss(h.float(), ht.float())),
            "soft": (soft_cross_entropy(logits, targets), original_soft_cross_entropy(logits.float(), targets.float())),
            "regression": (
                regression_mse(logits[:, 0], targets[:, 0]),
                F.mse_loss(logits[:, 0].float(), targets[:, 0].float()),
            ),
            "hard": (hard_cross_entropy(logits, torch.tensor([0, 1, 2, 0])), None),
        }
    for name, (ours, reference) in results.items():
        assert ours.dtype == torch.float32, name
        if reference is not None:
            assert torch.allclose(ours, reference.float(), atol=1e-6, rtol=1e-6), name


# ---- MiniLM relation losses: references written from the papers' equations, one row at a time ----


def reference_relation_kl(student, teacher, mask, heads):
    """MiniLMv2 eq.: per sequence, 1/(A_r |x|) sum_a sum_t KL(R^T_{a,t} || R^S_{a,t}), R_a = softmax(X_a X_a^T /
    sqrt(d_r)) over the real tokens, X_a = the a-th of `heads` equal slices of the width; then the batch mean.
    Loops over sequences, relation heads and query rows, in float64."""
    per_sequence = []
    for b in range(student.shape[0]):
        real = mask[b].nonzero().flatten()
        kls = []
        for a in range(heads):
            rows = {}
            for name, x in (("teacher", teacher), ("student", student)):
                d_r = x.shape[-1] // heads
                chunk = x[b, real, a * d_r:(a + 1) * d_r].double()  # n, d_r
                rows[name] = [torch.softmax(torch.stack([chunk[t] @ chunk[j] for j in range(len(real))])
                                            / math.sqrt(d_r), dim=0) for t in range(len(real))]
            for p, q in zip(rows["teacher"], rows["student"]):
                kls.append(sum(p[j] * math.log(p[j] / q[j]) for j in range(len(p))))
        per_sequence.append(sum(kls) / len(kls))
    return float(sum(per_sequence) / len(per_sequence))


def reference_attention_kl(student_scores, teacher_scores, mask):
    """MiniLM eq. 6 with einsum-free loops: KL(softmax(teacher row) || softmax(student row)) over the real keys of
    each real query row and head, mean per sequence, then over the batch."""
    per_sequence = []
    for b in range(student_scores.shape[0]):
        real = mask[b].nonzero().flatten()
        kls = []
        for h in range(student_scores.shape[1]):
            for t in real:
                p = teacher_scores[b, h, t, real].double().softmax(0)
                q = student_scores[b, h, t, real].double().softmax(0)
                kls.append((p * (p / q).log()).sum())
        per_sequence.append(torch.stack(kls).mean())
    return torch.stack(per_sequence).mean()


def qkv_batch(B=3, T=7, widths=(24, 16), seed=0):
    """Projections of a teacher (width widths[0]) and a student (widths[1]), and a mask with two padded rows."""
    g = torch.Generator().manual_seed(seed)
    teacher, student = (torch.randn(B, T, w, generator=g) * 2 for w in widths)
    _, _, mask = padded_batch(B=B, T=T)
    return student, teacher, mask


def test_attention_kl_by_hand():
    # One head, keys 0 and 1 real, key 2 padded (its scores must not count). Query 0: teacher scores [0, ln3] ->
    # [1/4, 3/4], student [0, 0] -> [1/2, 1/2]: KL = 1/4 ln(1/2) + 3/4 ln(3/2). Query 1: equal rows -> 0.
    # Query 2 is padding. Mean over the 2 real rows.
    t = torch.tensor([[[[0.0, math.log(3), 50.0], [1.0, 2.0, -9.0], [7.0, 7.0, 7.0]]]])
    s = torch.tensor([[[[0.0, 0.0, -50.0], [1.0, 2.0, 30.0], [0.0, 1.0, 2.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    assert attention_kl(s, t, mask).item() == pytest.approx(expected, rel=1e-6)


def test_relation_kl_by_hand():
    # One relation head of width 1 (d_r = 1), two real tokens: teacher x = [0, 1] -> rows of x_i x_j: [0, 0] and
    # [0, 1] -> softmax [1/2, 1/2] and [1/(1+e), e/(1+e)]. Student x = [0, 0]: both rows [1/2, 1/2].
    # KL row 0 = 0; row 1 = p ln(2p) + (1-p) ln(2(1-p)) with p = 1/(1+e). Mean over 2 rows.
    teacher, student, mask = torch.tensor([[[0.0], [1.0]]]), torch.zeros(1, 2, 1), torch.ones(1, 2)
    p = 1 / (1 + math.e)
    expected = (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))) / 2
    assert relation_kl(student, teacher, mask, 1).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_relation_kl_matches_the_paper_equation(heads):
    student, teacher, mask = qkv_batch()  # widths 24 and 16: d_r differs between the two models
    expected = reference_relation_kl(student, teacher, mask, heads)
    assert relation_kl(student, teacher, mask, heads).item() == pytest.approx(expected, rel=1e-5)


def test_value_relation_is_relation_kl_over_the_attention_heads():
    # MiniLM v1's value relation: softmax(V_h V_h^T / sqrt(d_k)) per attention head, written with einsum on the
    # (B, nh, T, hd) layout the attention uses; relation_kl with relation_heads = nh on (B, T, nh * hd) is the same.
    student, teacher, mask = qkv_batch(widths=(24, 12))
    nh = 4
    heads = lambda x: x.view(*x.shape[:2], nh, -1).transpose(1, 2)  # noqa: E731  B, nh, T, hd
    vr = lambda v: torch.einsum("bhid,bhjd->bhij", v, v) / math.sqrt(v.shape[-1])  # noqa: E731
    expected = reference_attention_kl(vr(heads(student)), vr(heads(teacher)), mask)
    assert relation_kl(student, teacher, mask, nh).item() == pytest.approx(expected.item(), rel=1e-5)


def test_attention_kl_matches_the_paper_equation():
    s, t, mask = padded_batch()
    assert attention_kl(s, t, mask).item() == pytest.approx(reference_attention_kl(s, t, mask).item(), rel=1e-5)


def test_relation_losses_zero_when_student_equals_teacher():
    s, _, mask = padded_batch()
    assert attention_kl(s, s.clone(), mask).item() == 0
    x, _, mask = qkv_batch(widths=(16, 16))
    for heads in (1, 4, 16):
        assert relation_kl(x, x.clone(), mask, heads).item() == 0
    # And positive otherwise (a KL divergence: 0 only at equality).
    student, teacher, mask = qkv_batch(widths=(16, 16))
    assert relation_kl(student, teacher, mask, 4).item() > 0


def test_relation_losses_unchanged_by_extra_padding():
    pad = 5
    s, t, mask = padded_batch()
    B, nh, T, _ = s.shape
    s2, t2 = torch.randn(B, nh, T + pad, T + pad) * 50, torch.randn(B, nh, T + pad, T + pad) * 50  # junk in padding
    s2[..., :T, :T], t2[..., :T, :T] = s, t
    mask2 = torch.cat([mask, torch.zeros(B, pad)], dim=1)
    assert attention_kl(s2, t2, mask2).item() == pytest.approx(attention_kl(s, t, mask).item(), rel=1e-6)
    student, teacher, mask = qkv_batch()
    student2 = torch.cat([student, torch.randn(B, pad, student.shape[-1]) * 50], dim=1)
    teacher2 = torch.cat([teacher, torch.randn(B, pad, teacher.shape[-1]) * 50], dim=1)
    mask2 = torch.cat([mask, torch.zeros(B, pad)], dim=1)
    assert relation_kl(student2, teacher2, mask2, 4).item() == pytest.approx(
        relation_kl(student, teacher, mask, 4).item(), rel=1e-6)


def test_relation_losses_fp32_and_finite_under_bf16_autocast():
    s, t, mask = padded_batch()
    s, t = (s * 100).bfloat16(), (t * 100).bfloat16()  # large scores: far-apart probabilities
    student, teacher, qmask = qkv_batch()
    student, teacher = (student * 8).bfloat16(), (teacher * 8).bfloat16()  # dot products of thousands
    with torch.autocast("cpu", dtype=torch.bfloat16):
        att = attention_kl(s, t, mask)
        rel = relation_kl(student.requires_grad_(), teacher, qmask, 4)
    for value, reference in ((att, attention_kl(s.float(), t.float(), mask)),
                             (rel, relation_kl(student.float(), teacher.float(), qmask, 4))):
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    rel.backward()
    assert torch.isfinite(student.grad).all()


def test_relation_gradients_finite_and_zero_in_padding():
    student, teacher, mask = qkv_batch()
    student.requires_grad_(True)
    relation_kl(student, teacher, mask, 4).backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[mask == 0].abs().max() == 0  # padded tokens take no part
    assert student.grad[mask == 1].abs().max() > 0


def test_relation_heads_and_teacher_layer_checks():
    with pytest.raises(ValueError, match="relation_heads 5 does not divide the width 16"):
        relation_kl(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), torch.ones(1, 2), 5)
    with pytest.raises(ValueError, match="head by head"):
        attention_kl(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3), torch.ones(1, 3))
    check_relation_heads(16, 384, 256)
    with pytest.raises(ValueError) as error:
        check_relation_heads(12, 384, 256)
    assert str(error.value) == ("recipe key relation_heads: 12 does not divide both the teacher's width 384 and the "
                                "student's 256; use a common divisor, e.g. 16 (any of 1, 2, 4, 8, 16, 32, 64, 128)")
    assert relation_layer_pairs(None, 6, 4) == [(4, 6)]
    assert relation_layer_pairs(5, 12, 4) == [(4, 5)]
    assert relation_layer_pairs("map", 6, 3, [0, 2, 4, 6]) == [(1, 2), (2, 4), (3, 6)]
    for bad in (0, 7, True):
        with pytest.raises(LayerMapError, match="recipe key teacher_layer: .* use 1 to 6 \\(null: the last, 6\\)"):
            relation_layer_pairs(bad, 6, 4)
