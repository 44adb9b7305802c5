"""Teacher + student + projections + layer map -> a dict of unweighted loss terms.

TinyBERT (Jiao et al., 2020) section 3.1: embedding, hidden-state, attention and prediction-layer distillation.
"""

from collections.abc import Iterable
from typing import get_args

import torch
from torch import Tensor, nn

from tinybert.losses import (
    LAYER_TERMS,
    LOSS_TERMS,
    Prediction,
    attention_mse,
    hard_cross_entropy,
    hidden_mse,
    regression_mse,
    resolve_layer_map,
    soft_cross_entropy,
)
from tinybert.model import Bert



class Projections(nn.Module):
    """The learned W_h of paper eq. 9-10: Linear(student_hidden -> teacher_hidden) for each mapped hidden state.

    shared=True: one Linear for all states (the original code's `fit_dense`, v1 checkpoints); shared=False: one per
    state, embeddings included (`fit_denses.0..M`, the paper and v2 checkpoints). No parameters when the widths match.
    They belong to the distillation and are never exported with the student.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, num_states: int, *, shared: bool = False):
        super().__init__()
        self.identity, self.shared = student_hidden == teacher_hidden, shared
        if not self.identity and shared:
            self.fit_dense = nn.Linear(student_hidden, teacher_hidden)
        elif not self.identity:
            self.fit_denses = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden) for _ in range(num_states))

    def forward(self, j: int, hidden: Tensor) -> Tensor:
        """Project student hidden state j (0 = embeddings): (B, T, H_student) -> (B, T, H_teacher)."""
        if self.identity:
            return hidden
        return self.fit_dense(hidden) if self.shared else self.fit_denses[j](hidden)


class Distiller(nn.Module):
    """Runs the frozen teacher and the student on a batch and returns the requested loss terms, unweighted.

    The student and the projections are submodules (trained, optimised, checkpointed). The teacher is not: it is kept
    outside `parameters()` and `state_dict()`, frozen, always in eval mode, and run without autograd; move it to its
    device/dtype yourself. layer_map is 'uniform' or an explicit list (see `resolve_layer_map`).
    """

    def __init__(
        self,
        teacher: Bert,
        student: Bert,
        layer_map: str | list[int],
        *,
        terms: Iterable[str] = LAYER_TERMS,
        attention_mode: str = "masked",
        prediction: str = "soft",
        temperature: float = 1.0,
        soft_mode: str = "original",
        shared_projection: bool = False,
    ):
        super().__init__()
        terms = tuple(terms)
        unknown = [t for t in terms if t not in LOSS_TERMS]
        if unknown or not terms:
            raise ValueError(f"loss terms {list(terms)} are invalid; choose among {', '.join(LOSS_TERMS)}")
        if prediction not in get_args(Prediction):
            raise ValueError(f"prediction {prediction!r} is unknown; choose one of {', '.join(get_args(Prediction))}")
        if attention_mode not in ("masked", "original") or soft_mode not in ("original", "batchmean"):
            raise ValueError(f"attention_mode {attention_mode!r} must be 'masked' or 'original' and soft_mode "
                             f"{soft_mode!r} 'original' or 'batchmean'")
        tc, sc = teacher.config, student.config
        if "prediction" in terms and not sc.num_labels:
            raise ValueError("the 'prediction' term needs a student with a head (num_labels > 0)")
        self.layer_map = resolve_layer_map(
            layer_map, tc.num_hidden_layers, sc.num_hidden_layers,
            teacher_heads=tc.num_attention_heads, student_heads=sc.num_attention_heads, attention="attention" in terms,
        )
        self.terms, self.attention_mode, self.prediction = terms, attention_mode, prediction
        self.temperature, self.soft_mode = temperature, soft_mode
        self.student = student
        self.projections = Projections(sc.hidden_size, tc.hidden_size, len(self.layer_map), shared=shared_projection)
        # Assigned past nn.Module.__setattr__ so the teacher is not registered: not trained, not in the checkpoint.
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the original left dropout on in the teacher; ours never trains
        return self

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: input_ids, attention_mask, token_type_ids (B, T); optional labels (B,), teacher_logits (B, C).

        Returns {term: scalar fp32 tensor} for the requested terms; "hidden" and "attention" are sums over layers.
        """
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        layer_map, M = self.layer_map, len(self.layer_map) - 1
        attention, predict = "attention" in self.terms, "prediction" in self.terms
        student = self.student(ids, mask, types, score_layers=tuple(range(1, M + 1)) if attention else ())

        teacher_logits = batch.get("teacher_logits")
        needs_logits = predict and self.prediction in ("soft", "mse_teacher") and teacher_logits is None
        if needs_logits or any(t in self.terms for t in LAYER_TERMS):
            # The teacher stops at its last mapped layer (at the embeddings if only they are compared) unless the
            # logits are needed, and computes explicit scores only for the mapped layers.
            last = layer_map[-1] if "hidden" in self.terms or attention else layer_map[0]
            with torch.no_grad():  # not inference_mode: its outputs then mix freely with the student's graph
                teacher = self.teacher(
                    ids, mask, types, score_layers=tuple(layer_map[1:]) if attention else (),
                    num_layers=None if needs_logits else last,
                )
            if needs_logits:
                teacher_logits = teacher.logits

        terms = {}
        if "embedding" in self.terms:
            terms["embedding"] = hidden_mse(
                self.projections(0, student.hidden_states[0]), teacher.hidden_states[layer_map[0]]
            )
        if "hidden" in self.terms:
            terms["hidden"] = sum(
                hidden_mse(self.projections(j, student.hidden_states[j]), teacher.hidden_states[layer_map[j]])
                for j in range(1, M + 1)
            )
        if attention:
            terms["attention"] = sum(
                attention_mse(student.attention_scores[j], teacher.attention_scores[layer_map[j]], mask,
                              self.attention_mode)
                for j in range(1, M + 1)
            )
        if predict:
            if self.prediction == "soft":
                terms["prediction"] = soft_cross_entropy(
                    student.logits, teacher_logits, self.temperature, self.soft_mode
                )
            elif self.prediction == "mse":  # STS-B: the original regresses to the gold scores
                terms["prediction"] = regression_mse(student.logits, batch["labels"])
            elif self.prediction == "mse_teacher":
                terms["prediction"] = regression_mse(student.logits, teacher_logits)
            else:
                terms["prediction"] = hard_cross_entropy(student.logits, batch["labels"])
        return terms
