"""Layer maps and the distillation losses, pure functions on tensors.

Follows TinyBERT (Jiao et al., 2020) section 3.1 (eq. 7-12) and the original code's `task_distill.py`.
"""

import numbers
from typing import Literal, get_args

import torch
import torch.nn.functional as F

# The one list of loss terms (section 3.1): recipes weight them (`terms:`), the distiller returns them, logs and
# model cards name them. The first three distil the intermediate layers (general distillation, task stage 1).
LossTerm = Literal["embedding", "hidden", "attention", "prediction"]
LOSS_TERMS: tuple[LossTerm, ...] = get_args(LossTerm)
LAYER_TERMS = LOSS_TERMS[:3]
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
