"""The one BERT shared by teachers and students (Devlin et al., 2019; TinyBERT, Jiao et al., 2020, section 3.1).

Layers whose attention scores nobody asked for run fused `scaled_dot_product_attention`; the layers a distillation
loss needs compute `QK^T/sqrt(d)` explicitly and return it before the mask is added (TinyBERT distils pre-softmax
scores, which neither HF's `output_attentions` nor the fused kernel give). MiniLM's relation losses need a layer's
queries, keys and values: those come back for the layers asked for, whichever attention path the layer runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# HF's "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}



@dataclass(frozen=True)
class BertConfig:
    """Field names are Hugging Face's `BertConfig` names, so `config.json` maps one to one."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Head: 0 = bare encoder; 1 with problem_type "regression" = STS-B-style regression; >= 2 = classification.
    num_labels: int = 0
    problem_type: str | None = None
    id2label: dict[int, str] | None = None

    def __post_init__(self):
        # Values no BERT can have are refused here, as config.json is read: before they surface as an IndexError
        # in the embeddings or a ZeroDivisionError in the head width.
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} is {value!r}; a BERT needs a whole number of at least 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides the width"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1 or self.problem_type == "regression"

    @classmethod
    def preset(cls, name: str, **overrides) -> BertConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or give a model directory")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes) -> BertConfig:
        return dataclasses.replace(self, **changes)


PRESETS = {
    "bert-base": BertConfig(),
    "tinybert-4l-312d": BertConfig(hidden_size=312, num_hidden_layers=4, intermediate_size=1200),
    "tinybert-6l-768d": BertConfig(num_hidden_layers=6),
}

class BertOutput(NamedTuple):
    hidden_states: list[Tensor]  # L+1 tensors (B, T, H): embedding output first
    attention_scores: dict[int, Tensor]  # 1-based layer -> (B, nh, T, T) QK^T/sqrt(d), mask not added
    pooled: Tensor | None  # (B, H) tanh(W h_[CLS]); None when the forward stopped early
    logits: Tensor | None  # (B, num_labels) when the model has a head
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]]  # 1-based layer -> queries, keys, values, each (B, T, H)


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        # HF's summation order (word + token type, then position), so fp32 outputs match it bit for bit.
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)  # B, T, H
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q = nn.Linear(H, H)
        self.k = nn.Linear(H, H)
        self.v = nn.Linear(H, H)
        self.out = nn.Linear(H, H)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, keep: Tensor | None, with_scores: bool) -> tuple[Tensor, Tensor | None, tuple]:
        """x: (B, T, H); keep: (B, 1, 1, T) bool, True where the key is a real token; None when all are.

        Returns the output (B, T, H), the pre-softmax scores (B, nh, T, T) or None, and the projections (q, k, v),
        each (B, T, H): every head's vectors side by side, as MiniLM's relations take them."""
        B, T, H = x.shape
        nh, hd = self.num_heads, H // self.num_heads
        projections = (self.q(x), self.k(x), self.v(x))  # each B, T, H
        q, k, v = (p.view(B, T, nh, hd).transpose(1, 2) for p in projections)  # B, nh, T, hd
        dropout_p = self.dropout_p if self.training else 0.0
        scores = None
        if with_scores:
            scores = (q @ k.transpose(-1, -2)) * hd**-0.5  # B, nh, T, T
            masked = scores if keep is None else scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            probs = F.dropout(masked.softmax(dim=-1), p=dropout_p, training=self.training)
            context = probs @ v  # B, nh, T, hd
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(B, T, H)  # B, T, nh*hd
        return self.out(context), scores, projections


class Layer(nn.Module):
    """Post-LayerNorm transformer block: attention, residual + LN, GELU feed-forward, residual + LN."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, keep: Tensor | None, with_scores: bool) -> tuple[Tensor, Tensor | None, tuple]:
        attended, scores, projections = self.attn(x, keep, with_scores)
        x = self.attn_norm(x + self.dropout(attended))
        x = self.ffn_norm(x + self.dropout(self.down(self.act(self.up(x)))))
        return x, scores, projections


class MLMHead(nn.Module):
    """BERT's masked-LM head (kept when a pre-training checkpoint is loaded; used by data augmentation).
    The decoder weight is tied to the word embeddings, as in BERT."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(hidden))) @ word_embeddings.T + self.bias  # B, T, V


class Bert(nn.Module):
    def __init__(self, config: BertConfig, *, mlm_head: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        # HF's BertForSequenceClassification head: dropout + Linear on the pooled output.
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels else None
        self.head_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.mlm = MLMHead(config) if mlm_head else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        score_layers: tuple[int, ...] | list[int] | set[int] = (),
        qkv_layers: tuple[int, ...] | list[int] | set[int] = (),
        num_layers: int | None = None,
    ) -> BertOutput:
        """input_ids, attention_mask (1 = real token), token_type_ids: (B, T).

        score_layers: 1-based layers whose pre-softmax scores to return (the others run fused attention).
        qkv_layers: 1-based layers whose queries, keys and values to return (the attention path is unchanged).
        num_layers: run only the first `num_layers` layers (a teacher needs no more than its last mapped layer);
        pooled and logits are then None.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        L = self.config.num_hidden_layers if num_layers is None else num_layers
        # Without padding the fused kernel runs unmasked, which is faster (transformers drops such masks too).
        keep = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]  # B, 1, 1, T
        x = self.embeddings(input_ids, token_type_ids)
        hidden_states, attention_scores, qkv = [x], {}, {}
        for i, layer in enumerate(self.layers[:L], start=1):
            x, scores, projections = layer(x, keep, i in score_layers)
            hidden_states.append(x)
            if scores is not None:
                attention_scores[i] = scores
            if i in qkv_layers:  # kept only where asked: the others are freed as the forward goes on
                qkv[i] = projections
        if L < self.config.num_hidden_layers:
            return BertOutput(hidden_states, attention_scores, None, None, qkv)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # B, H
        logits = self.classifier(self.head_dropout(pooled)) if self.classifier is not None else None
        return BertOutput(hidden_states, attention_scores, pooled, logits, qkv)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        if self.mlm is None:
            raise ValueError("this model has no masked-LM head; load a BertForMaskedLM/BertForPreTraining checkpoint")
        return self.mlm(hidden, self.embeddings.word.weight)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts split into embeddings / encoder / heads (pooler, classifier, MLM head)."""
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        embeddings, encoder = count(self.embeddings), count(self.layers)
        heads = count(self.pooler) + count(self.classifier) + count(self.mlm)
        return {"embeddings": embeddings, "encoder": encoder, "heads": heads, "total": embeddings + encoder + heads}
