"""Teacher + student + projections + layer map -> a dict of unweighted loss terms.

TinyBERT (Jiao et al., 2020) section 3.1: embedding, hidden-state, attention and prediction-layer distillation;
MiniLM (Wang et al., 2020) and MiniLMv2 (Wang et al., 2021): attention-distribution and q/k/v relation transfer.
"""

from collections.abc import Iterable
from typing import get_args

import torch
from torch import Tensor, nn

from tinybert.losses import (
    LAYER_TERMS,
    LOSS_TERMS,
    MINILM_TERMS,
    RELATION_TERMS,
    LayerMapError,
    Prediction,
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
        self.student_hidden, self.teacher_hidden = student_hidden, teacher_hidden
        if not self.identity and shared:
            self.fit_dense = nn.Linear(student_hidden, teacher_hidden)
        elif not self.identity:
            self.fit_denses = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden) for _ in range(num_states))

    def start_from(self, found: dict[str, Tensor]) -> str | None:
        """Start from a general checkpoint's learned projections instead of at random, as the original's task
        distillation starts from its general model's `fit_dense`: `found` holds `fit_dense.*` (one shared Linear,
        copied into every per-state one when the recipe has those) or `fit_denses.N.*` (one per state; the count
        must match). Returns what was done, for the run's log; None when the checkpoint has none."""
        if not found:
            return None
        if self.identity:
            return "its fit_dense projections are unused: student and teacher have the same width (identity)"
        names = sorted({k.rsplit(".", 1)[0] for k in found})
        mine = ["fit_dense"] if self.shared else [f"fit_denses.{j}" for j in range(len(self.fit_denses))]
        if names == ["fit_dense"]:
            state = {f"{m}.{p}": found[f"fit_dense.{p}"] for m in mine for p in ("weight", "bias") if
                     f"fit_dense.{p}" in found}
        elif names == sorted(mine):
            state = found
        else:
            return (f"its projections ({', '.join(names[:3])}{'...' if len(names) > 3 else ''}) do not match the "
                    f"recipe's {len(mine)} ({'shared' if self.shared else 'one per state'}); they start random")
        expected = self.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            weight = next((tuple(t.shape) for k, t in found.items() if k.endswith("weight")), None)
            return (f"its projections (weight {weight}) do not fit Linear({self.student_hidden} -> "
                    f"{self.teacher_hidden}); they start random")
        self.load_state_dict(state)
        return f"the projections start from its {names[0] if len(names) == 1 else 'fit_denses'} (not random)"

    def forward(self, j: int, hidden: Tensor) -> Tensor:
        """Project student hidden state j (0 = embeddings): (B, T, H_student) -> (B, T, H_teacher)."""
        if self.identity:
            return hidden
        return self.fit_dense(hidden) if self.shared else self.fit_denses[j](hidden)


class Distiller(nn.Module):
    """Runs the frozen teacher and the student on a batch and returns the requested loss terms, unweighted.

    The student and the projections are submodules (trained, optimised, checkpointed). The teacher is not: it is kept
    outside `parameters()` and `state_dict()`, frozen, always in eval mode, and run without autograd; move it to its
    device/dtype yourself. layer_map is 'uniform' or an explicit list (see `resolve_layer_map`), resolved only when a
    term uses it. The relation terms pair layers by teacher_layer (see `relation_layer_pairs`); relation_heads splits
    the widths for q/k/v_relation (see `relation_kl`).
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
        relation_heads: int = 12,
        teacher_layer: int | str | None = None,
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
        # The layer map is resolved only where a term uses it: a relation-only run needs no map between depths.
        self.layer_map = None
        if any(t in terms for t in LAYER_TERMS) or teacher_layer == "map":
            self.layer_map = resolve_layer_map(
                layer_map, tc.num_hidden_layers, sc.num_hidden_layers, teacher_heads=tc.num_attention_heads,
                student_heads=sc.num_attention_heads, attention="attention" in terms,
            )
        self.relation_layers = []  # (student layer, teacher layer) pairs of the relation terms
        if any(t in terms for t in (*MINILM_TERMS, *RELATION_TERMS)):
            self.relation_layers = relation_layer_pairs(
                teacher_layer, tc.num_hidden_layers, sc.num_hidden_layers, self.layer_map
            )
        v1 = [t for t in terms if t in MINILM_TERMS]
        if v1 and tc.num_attention_heads != sc.num_attention_heads:
            raise LayerMapError(
                f"recipe terms {', '.join(v1)} (MiniLM) compare teacher and student head by head, but the teacher has "
                f"{tc.num_attention_heads} heads and the student {sc.num_attention_heads}; give the student "
                f"{tc.num_attention_heads} heads, or use q_relation, k_relation, v_relation (any head counts)"
            )
        if any(t in terms for t in RELATION_TERMS):
            check_relation_heads(relation_heads, tc.hidden_size, sc.hidden_size)
        self.relation_heads, self.teacher_layer = relation_heads, teacher_layer
        self.terms, self.attention_mode, self.prediction = terms, attention_mode, prediction
        self.temperature, self.soft_mode = temperature, soft_mode
        self.student = student
        states = len(self.layer_map) if self.layer_map is not None else 0
        self.projections = Projections(sc.hidden_size, tc.hidden_size, states, shared=shared_projection)
        # Assigned past nn.Module.__setattr__ so the teacher is not registered: not trained, not in the checkpoint.
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())

    def describe_relations(self) -> list[str]:
        """For a dry run: each relation term's (student <- teacher) layers and whether head counts must match."""
        terms = [t for t in self.terms if t in MINILM_TERMS or t in RELATION_TERMS]
        if not terms:
            return []
        tc, sc = self.teacher.config, self.student.config
        source = {None: "teacher_layer null: the teacher's last layer teaches the student's last",
                  "map": "teacher_layer map: student layer j <- teacher layer layer_map[j]"}.get(
            self.teacher_layer, f"teacher_layer {self.teacher_layer} teaches the student's last layer")
        lines = [f"relation terms (MiniLM; {source}):"]
        pairs = ", ".join(f"layer {s} <- layer {t}" for s, t in self.relation_layers)
        for term in terms:
            if term in MINILM_TERMS:
                check = (f"head counts must match, and do: {tc.num_attention_heads} heads in both (v1 compares "
                         f"attention heads one to one)")
            else:
                rh = self.relation_heads
                check = (f"no head-count check: {rh} relation heads split each width (d_r {tc.hidden_size // rh} "
                         f"teacher, {sc.hidden_size // rh} student), whatever the attention heads "
                         f"({tc.num_attention_heads} teacher, {sc.num_attention_heads} student)")
            lines.append(f"  {term}: student {pairs}; {check}")
        return lines

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the original left dropout on in the teacher; ours never trains
        return self

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: input_ids, attention_mask, token_type_ids (B, T); optional labels (B,), teacher_logits (B, C).

        Returns {term: scalar fp32 tensor} for the requested terms; "hidden", "attention" and the relation terms are
        sums over the layers they pair.
        """
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        layer_map, pairs = self.layer_map, self.relation_layers
        M = len(layer_map) - 1 if layer_map is not None else 0
        attention, predict = "attention" in self.terms, "prediction" in self.terms
        kl_scores = "attention_relation" in self.terms
        qkv = any(t in self.terms for t in ("value_relation", *RELATION_TERMS))
        student_scores = set(range(1, M + 1)) if attention else set()
        student_scores |= {s for s, _ in pairs} if kl_scores else set()
        student = self.student(ids, mask, types, score_layers=student_scores,
                               qkv_layers={s for s, _ in pairs} if qkv else ())

        teacher_logits = batch.get("teacher_logits")
        needs_logits = predict and self.prediction in ("soft", "mse_teacher") and teacher_logits is None
        needed = [layer_map[0]] if "embedding" in self.terms else []  # the teacher states the terms compare
        needed += layer_map[1:] if "hidden" in self.terms or attention else []
        needed += [t for _, t in pairs]
        if needs_logits or needed:
            # The teacher stops at the last state a term compares (at the embeddings if only they are) unless the
            # logits are needed, and computes explicit scores, or keeps q/k/v, only for the layers compared.
            teacher_scores = set(layer_map[1:]) if attention else set()
            teacher_scores |= {t for _, t in pairs} if kl_scores else set()
            with torch.no_grad():  # not inference_mode: its outputs then mix freely with the student's graph
                teacher = self.teacher(
                    ids, mask, types, score_layers=teacher_scores, qkv_layers={t for _, t in pairs} if qkv else (),
                    num_layers=None if needs_logits else max(needed),
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
        if kl_scores:
            terms["attention_relation"] = sum(
                attention_kl(student.attention_scores[s], teacher.attention_scores[t], mask) for s, t in pairs
            )
        if "value_relation" in self.terms:  # v1: relation heads = the attention heads (equal in both models)
            heads = self.teacher.config.num_attention_heads
            terms["value_relation"] = sum(
                relation_kl(student.qkv[s][2], teacher.qkv[t][2], mask, heads) for s, t in pairs
            )
        for name, i in RELATION_TERMS.items():
            if name in self.terms:
                terms[name] = sum(
                    relation_kl(student.qkv[s][i], teacher.qkv[t][i], mask, self.relation_heads) for s, t in pairs
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
