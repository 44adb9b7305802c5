"""Layer maps and the distillation losses, pure functions on tensors.

Follows TinyBERT (Jiao et al., 2020) section 3.1 (eq. 7-12) and the original code's `task_distill.py`; the relation
losses follow MiniLM (Wang et al., 2020, section 3: attention distributions and value relations of the last layer)
and MiniLMv2 (Wang et al., 2021, section 3: query, key and value relations over relation heads).
"""

import math
import numbers
from typing import Literal, get_args

import torch
import torch.nn.functional as F

# The one list of loss terms: recipes weight them (`terms:`), the distiller returns them, logs and model cards name
# them. TinyBERT's (section 3.1): the layer terms distil the intermediate layers through the layer map (general
# distillation, task stage 1), then the prediction term. MiniLM's (v1): attention distributions and value relations,
# head by head, so head counts must match. MiniLMv2's: query, key and value relations over relation heads, each with
# its index into a layer's (q, k, v).
LayerTerm = Literal["embedding", "hidden", "attention"]
MiniLMTerm = Literal["attention_relation", "value_relation"]
RelationTerm = Literal["q_relation", "k_relation", "v_relation"]
LossTerm = Literal[LayerTerm, "prediction", MiniLMTerm, RelationTerm]
LOSS_TERMS: tuple[LossTerm, ...] = get_args(LossTerm)
LAYER_TERMS: tuple[LayerTerm, ...] = get_args(LayerTerm)
MINILM_TERMS: tuple[MiniLMTerm, ...] = get_args(MiniLMTerm)
RELATION_TERMS: dict[RelationTerm, int] = {term: i for i, term in enumerate(get_args(RelationTerm))}
# What the prediction term compares: soft teacher targets, gold scores, the teacher's scores, gold labels.
Prediction = Literal["soft", "mse", "mse_teacher", "hard"]


class LayerMapError(ValueError):
    """A layer map that cannot be used with this teacher and student."""


def uniform_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Student hidden state j learns from teacher state j*k, k = N/M, 0 = embeddings (paper: g(m) = 3m for 12 -> 4).

    12 -> 4 gives [0, 3, 6, 9, 12]; 12 -> 6 gives [0, 2, 4, 6, 8, 10, 12]; 6 -> 3 gives [0, 2, 4, 6].
    """
    if student_layers < 1 or teacher_layers % student_layers:
        raise LayerMapError(
            f"no uniform layer map from a {teacher_layers}-layer teacher to a {student_layers}-layer student: "
            f"{teacher_layers} is not a multiple of {student_layers}; give an explicit list of "
            f"{student_layers + 1} teacher states instead, e.g. {_example_map(teacher_layers, student_layers)}"
        )
    k = teacher_layers // student_layers
    return [j * k for j in range(student_layers + 1)]


def resolve_layer_map(
    spec: str | list[int],
    teacher_layers: int,
    student_layers: int,
    *,
    teacher_heads: int | None = None,
    student_heads: int | None = None,
    attention: bool = True,
) -> list[int]:
    """Turn a recipe's `layer_map` ('uniform' or an explicit list) into a checked list of M+1 teacher states.

    map[j] is the teacher hidden state that student state j learns from (0 = embeddings); with the attention loss on,
    student layer j (1-based) also learns teacher layer map[j]'s scores, so head counts must match.
    """
    if isinstance(spec, str):
        if spec != "uniform":
            raise LayerMapError(f"layer map {spec!r} is unknown; give 'uniform' or an explicit list of teacher states")
        layer_map = uniform_layer_map(teacher_layers, student_layers)
    else:
        layer_map = list(spec)
        problem = None
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layer_map):
            problem = "its entries must be integers"
        elif len(layer_map) != student_layers + 1:
            problem = (f"it has {len(layer_map)} entries but a {student_layers}-layer student needs "
                       f"{student_layers + 1} (the embeddings, then one per layer)")
        elif layer_map[0] != 0:
            problem = "it must start at 0 (student embeddings learn from teacher embeddings)"
        elif any(b <= a for a, b in zip(layer_map, layer_map[1:])):
            problem = "it must be strictly increasing"
        elif layer_map[-1] > teacher_layers:
            problem = f"it goes beyond the teacher, which has states 0..{teacher_layers}"
        if problem:
            raise LayerMapError(
                f"layer map {layer_map} is invalid: {problem}. Each entry j is the teacher state student state j "
                f"learns from (0 = embeddings); for {teacher_layers} -> {student_layers} layers try "
                f"{_example_map(teacher_layers, student_layers)}"
            )
        layer_map = [int(i) for i in layer_map]
    if attention and teacher_heads is not None and student_heads is not None and teacher_heads != student_heads:
        raise LayerMapError(
            f"attention distillation compares scores head by head, but the teacher has {teacher_heads} heads and the "
            f"student {student_heads} (layer map {layer_map}); give the student {teacher_heads} heads or leave "
            f"'attention' out of the loss terms"
        )
    return layer_map


def relation_layer_pairs(
    teacher_layer: int | str | None, teacher_layers: int, student_layers: int, layer_map: list[int] | None = None
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based, that the relation losses compare.

    teacher_layer None: the teacher's last layer teaches the student's last (MiniLM); an int: that teacher layer
    teaches the student's last (MiniLMv2 takes an upper-middle layer of large teachers); "map": student layer j
    learns teacher layer layer_map[j], every layer, as TinyBERT's attention loss does.
    """
    if teacher_layer == "map":
        if layer_map is None:
            raise LayerMapError("teacher_layer 'map' pairs the layers through layer_map, which is not resolved")
        return [(j, layer_map[j]) for j in range(1, student_layers + 1)]
    if teacher_layer is None:
        return [(student_layers, teacher_layers)]
    ok = isinstance(teacher_layer, numbers.Integral) and not isinstance(teacher_layer, bool)
    if not ok or not 1 <= teacher_layer <= teacher_layers:
        raise LayerMapError(
            f"recipe key teacher_layer: {teacher_layer!r} is not a layer of the {teacher_layers}-layer teacher; use "
            f"1 to {teacher_layers} (null: the last, {teacher_layers}), or 'map' to pair every student layer with "
            f"its layer_map entry"
        )
    return [(student_layers, int(teacher_layer))]


def check_relation_heads(relation_heads: int, teacher_width: int, student_width: int):
    """MiniLMv2 splits each model's width into `relation_heads` equal chunks, so it must divide both widths."""
    if relation_heads >= 1 and not teacher_width % relation_heads and not student_width % relation_heads:
        return
    common = math.gcd(teacher_width, student_width)
    divisors = [d for d in range(1, common + 1) if not common % d]
    closest = min(divisors, key=lambda d: (abs(d - relation_heads), -d))
    raise ValueError(
        f"recipe key relation_heads: {relation_heads} does not divide both the teacher's width {teacher_width} and "
        f"the student's {student_width}; use a common divisor, e.g. {closest} (any of {', '.join(map(str, divisors))})"
    )


def _example_map(teacher_layers: int, student_layers: int) -> str:
    # A spread-out map to suggest in error messages; a student deeper than its teacher has none.
    if student_layers < 1 or student_layers > teacher_layers:
        return "(none: the student needs between 1 and as many layers as the teacher)"
    return str([round(j * teacher_layers / student_layers) for j in range(student_layers + 1)])


def _fp32(x: torch.Tensor):
    # Losses are computed in fp32 even inside a bf16/fp16 autocast region.
    return torch.autocast(device_type=x.device.type, enabled=False)


def attention_mse(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, attention_mask: torch.Tensor, mode: str = "masked"
) -> torch.Tensor:
    """MSE between pre-softmax attention scores QK^T/sqrt(d), mask NOT added (paper eq. 7-8).

    scores: (B, nh, T, T); attention_mask: (B, T), 1 = real token, 0 = padding. Returns a scalar.
    mode "masked" (default): mean over real (query, key) pairs of every head, so padding does not change it.
    mode "original": reproduces the original code: -10000 on padded keys in both, entries <= -1e2 set to 0 in both,
    then the mean over all B*nh*T*T cells, padded ones included (so the value shrinks as padding grows).
    """
    with _fp32(student_scores):
        s, t, m = student_scores.float(), teacher_scores.float(), attention_mask.float()
        if mode == "original":
            extended = ((1.0 - m) * -10000.0)[:, None, None, :]  # B, 1, 1, T: padded keys
            s, t = s + extended, t + extended
            s = torch.where(s <= -1e2, torch.zeros_like(s), s)
            t = torch.where(t <= -1e2, torch.zeros_like(t), t)
            return F.mse_loss(s, t)
        if mode == "masked":
            pairs = m[:, None, :, None] * m[:, None, None, :]  # B, 1, T, T: 1 where query and key are real
            return ((s - t).pow(2) * pairs).sum() / (pairs.sum() * s.shape[1])
        raise ValueError(f"attention_mse mode {mode!r} is unknown; use 'masked' or 'original'")


def _row_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between the rows of softmax(logits) taken over the real keys, both (B, h, T, T).

    Each row (a query token of one head) is a distribution over the keys; padded keys get probability 0 in both and
    add nothing. Reduction as MiniLM's eq. 1/(A_h |x|) sum_a sum_t: the mean over the real query rows of each
    sequence and over the heads, then the mean over the batch. Padding therefore never changes the value.
    """
    keep = attention_mask.bool()  # B, T
    keys = keep[:, None, None, :]  # B, 1, 1, T
    low = torch.finfo(torch.float32).min  # finite: no inf - inf = nan in the padded cells we discard below
    log_t = teacher_logits.float().masked_fill(~keys, low).log_softmax(-1)  # B, h, T, T
    log_s = student_logits.float().masked_fill(~keys, low).log_softmax(-1)
    kl = torch.where(keys, log_t.exp() * (log_t - log_s), 0.0).sum(-1)  # B, h, T: one KL per head and query
    rows = keep.float()[:, None, :]  # B, 1, T: real query rows
    per_sequence = (kl * rows).sum((1, 2)) / (rows.sum((1, 2)).clamp(min=1) * kl.shape[1])  # B
    return per_sequence.mean()


def relation_logits(x: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """MiniLMv2's relation scores: x (B, T, H) (every attention head's queries, keys or values side by side) split
    into `relation_heads` chunks of d_r = H / relation_heads, then X_a X_a^T / sqrt(d_r): (B, relation_heads, T, T)."""
    B, T, H = x.shape
    if H % relation_heads:
        raise ValueError(f"relation_heads {relation_heads} does not divide the width {H}")
    d_r = H // relation_heads
    x = x.view(B, T, relation_heads, d_r).transpose(1, 2)  # B, A_r, T, d_r
    return (x @ x.transpose(-1, -2)) * d_r**-0.5  # B, A_r, T, T


def attention_kl(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """MiniLM's self-attention distribution transfer: KL(teacher || student) between softmax(scores) over the real
    keys, head by head. scores: (B, nh, T, T) pre-softmax QK^T/sqrt(d), mask NOT added (what the model returns);
    attention_mask: (B, T), 1 = real token. The head counts must match; the widths need not. Returns a scalar: the
    mean over real query rows and heads of each sequence, then over the batch (see `_row_kl`)."""
    if student_scores.shape[1] != teacher_scores.shape[1]:
        raise ValueError(f"attention_kl compares head by head: the student has {student_scores.shape[1]} heads and "
                         f"the teacher {teacher_scores.shape[1]}")
    with _fp32(student_scores):
        return _row_kl(student_scores, teacher_scores, attention_mask)


def relation_kl(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor, relation_heads: int
) -> torch.Tensor:
    """MiniLMv2's relation transfer: KL(teacher || student) between softmax(X_a X_a^T / sqrt(d_r)) of each relation
    head a, each model with its own d_r = width / relation_heads.

    student (B, T, H_s), teacher (B, T, H_t): one kind of vectors (queries, keys or values) of one layer, every
    attention head's side by side; the widths may differ, `relation_heads` must divide both. attention_mask: (B, T).
    Returns a scalar, reduced as `_row_kl`. With relation_heads = the attention head count and the values, this is
    MiniLM's (v1) value relation: softmax(V_a V_a^T / sqrt(d_k)) per attention head.
    """
    with _fp32(student):
        s = relation_logits(student.float(), relation_heads)  # B, A_r, T, T
        t = relation_logits(teacher.float(), relation_heads)
        return _row_kl(s, t, attention_mask)


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """MSE between (projected) student and teacher hidden states (paper eq. 9-10), both (B, T, H).

    Mean over all B*T*H entries, padded positions included, as in the original. The caller applies the projection.
    """
    with _fp32(student_hidden):
        return F.mse_loss(student_hidden.float(), teacher_hidden.float())


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, mode: str = "original"
) -> torch.Tensor:
    """Cross-entropy of student logits against the teacher's softened distribution (paper eq. 11), both (B, C).

    mode "original" reproduces the original: (-softmax(t/T) * log_softmax(s/T)).mean(), a mean over batch AND
    classes (CE / C) with no T^2 factor. mode "batchmean": sum over classes, mean over batch, times T^2 (Hinton et
    al.), so the gradient scale does not depend on C or T. Either way it is a cross-entropy, not a KL divergence: at
    student == teacher it equals the teacher's entropy (its minimum), not 0.
    """
    with _fp32(student_logits):
        log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
        q = F.softmax(teacher_logits.float() / temperature, dim=-1)
        if mode == "original":
            return (-q * log_p).mean()
        if mode == "batchmean":
            return (-q * log_p).sum(-1).mean() * temperature**2
        raise ValueError(f"soft_cross_entropy mode {mode!r} is unknown; use 'original' or 'batchmean'")


def regression_mse(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE for regression tasks (STS-B): predictions (B,) or (B, 1) against targets (B,) or (B, 1); mean over B."""
    with _fp32(predictions):
        return F.mse_loss(predictions.float().reshape(-1), targets.float().reshape(-1))


def hard_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, C) against gold class indices labels (B,); mean over B."""
    with _fp32(logits):
        return F.cross_entropy(logits.float(), labels.long())
