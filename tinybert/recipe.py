"""Recipes: YAML files -> one typed dataclass. Unknown keys and values of the wrong type are errors, caught before
any model is loaded. `key=value` overrides from the command line use the same checks (dotted keys reach into
the dict-valued fields: `terms.attention=0`, `deepspeed.zero_optimization.stage=2`).

Task distillation runs two stages; `stage1` and `stage2` hold the keys each stage sets differently, and a stage runs
with the top-level keys replaced by its own (`Recipe.stage`). `stage1.epochs=1` overrides one stage; an override
without a stage prefix (`epochs=1`) sets the key for every stage, i.e. it also removes the key from both stages.
`null` for max_seq_length and epochs means the task decides: 64 or 128 tokens, and `task_epochs` (the paper's
per-task epochs)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from tinybert.losses import LOSS_TERMS, LossTerm, Prediction

RECIPE_DIR = Path(__file__).parent / "recipes"


class RecipeError(ValueError):
    pass


@dataclass
class Recipe:
    """Every key a recipe may set; the YAML files in recipes/ document each one."""

    recipe: Literal["general", "task", "finetune"] = "general"
    seed: int = 42
    max_seq_length: typing.Optional[int] = 128  # null: the task's (paper: 64 single sentence, 128 pairs)
    # Optimisation. batch_size is the global batch of one optimizer step; each micro-batch holds
    # batch_size / (grad_accum * world_size) examples.
    batch_size: int = 256
    grad_accum: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-6
    scheduler: str = "linear"  # any transformers.get_scheduler name: linear, constant, constant_with_warmup, cosine
    warmup_ratio: float = 0.1
    epochs: typing.Optional[float] = 3.0  # null: task_epochs[task], else task_epochs["default"]
    task_epochs: dict = field(default_factory=dict)  # task name (or "default") -> epochs, used when epochs is null
    max_steps: int = 0  # > 0 overrides epochs
    max_grad_norm: float = 1.0
    # auto = bf16 where it is the fast path (CUDA with bf16, CPUs with AMX), fp32 elsewhere; bf16 = autocast.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Distillation.
    layer_map: typing.Union[str, list[int]] = "uniform"
    terms: dict[LossTerm, float] = field(default_factory=lambda: {"embedding": 1.0, "hidden": 1.0, "attention": 1.0})
    attention_mode: Literal["masked", "original"] = "masked"
    shared_projection: bool = False
    prediction: Prediction = "soft"
    temperature: float = 1.0
    soft_mode: Literal["original", "batchmean"] = "original"
    # MiniLM relation terms: teacher_layer null = the teacher's last layer teaches the student's last; an int = that
    # teacher layer; "map" = every student layer j learns teacher layer layer_map[j]. relation_heads (q/k/v_relation
    # only) must divide both widths.
    relation_heads: int = 12
    teacher_layer: typing.Optional[typing.Union[int, str]] = None
    # Data.
    heldout_fraction: float = 0.01
    max_train_examples: int = 0  # tasks: > 0 keeps the first N training rows (quick runs); 0 = all
    max_eval_examples: int = 0  # tasks: > 0 keeps the first N rows of each evaluation split; 0 = all
    # Logging and checkpoints, in optimizer steps; 0 = at the end of every epoch.
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 500
    keep_checkpoints: int = 2
    # Passed to deepspeed.initialize as its JSON config when present; the plain engine runs otherwise.
    # A JSON file path is read (relative paths from the current directory, then from the bundled recipes/).
    deepspeed: typing.Optional[typing.Union[dict, str]] = None
    # Task distillation: the keys each stage sets differently (any key above except recipe and deepspeed).
    stage1: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)

    def __post_init__(self):
        for key, hint in HINTS.items():  # the keys that take one of a fixed set of strings
            allowed = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
            if allowed and getattr(self, key) not in allowed:
                raise RecipeError(f"recipe key {key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in (*POSITIVE, *NOT_NEGATIVE):
            value = getattr(self, key)
            if value is not None and (value <= 0 if key in POSITIVE else value < 0):
                bound = "positive" if key in POSITIVE else "0 or more"
                raise RecipeError(f"recipe key {key} must be {bound}, got {value}")
        if self.warmup_ratio > 1 or self.heldout_fraction >= 1:  # fractions of the steps, of the corpus
            raise RecipeError(f"recipe keys warmup_ratio (0 to 1) and heldout_fraction (0 to below 1) are fractions, "
                              f"got {self.warmup_ratio} and {self.heldout_fraction}")
        if self.recipe == "general" and (self.max_seq_length is None or self.epochs is None):
            raise RecipeError("recipe keys max_seq_length and epochs may be null only in task and finetune recipes")
        for task, epochs in self.task_epochs.items():
            if not _matches(epochs, float) or epochs < 0:
                raise RecipeError(f"recipe key task_epochs.{task}: expected a number of epochs, got {epochs!r}")
        if self.batch_size % self.grad_accum:
            raise RecipeError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if isinstance(self.layer_map, str) and self.layer_map != "uniform":
            raise RecipeError(f"recipe key layer_map: give 'uniform' or a list like [0, 3, 6, 9, 12], "
                              f"not {self.layer_map!r}")
        if isinstance(self.teacher_layer, str) and self.teacher_layer != "map" or (
                isinstance(self.teacher_layer, int) and self.teacher_layer < 1):
            raise RecipeError(f"recipe key teacher_layer: {self.teacher_layer!r} is not a teacher layer; give a "
                              f"layer number from 1, null (the teacher's last) or 'map'")
        for term, weight in self.terms.items():
            if term not in LOSS_TERMS:
                raise RecipeError(f"recipe key terms.{term}: unknown loss term; use {', '.join(LOSS_TERMS)}")
            if not _matches(weight, float):
                raise RecipeError(f"recipe key terms.{term}: weight must be a number, got {weight!r}")
        for name in STAGES:
            keys = getattr(self, name)
            for key, value in keys.items():
                if key not in STAGE_KEYS:
                    raise _unknown(key, f"{name}.", STAGE_KEYS)
                keys[key] = _check_type(key, value, f"{name}.{key}")
            try:
                if keys:  # the merged stage recipe runs these same checks on every value
                    self.stage(name)
            except RecipeError as e:
                raise RecipeError(f"{name}: {e}") from None

    def stage(self, name: str) -> Recipe:
        """The recipe one task-distillation stage runs with: the top-level keys, replaced by the stage's own."""
        return dataclasses.replace(self, **copy.deepcopy(getattr(self, name)), stage1={}, stage2={})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
HINTS = typing.get_type_hints(Recipe)
STAGES = ("stage1", "stage2")
STAGE_KEYS = [k for k in FIELDS if k not in ("recipe", "deepspeed", *STAGES)]  # the keys a stage may set
POSITIVE = ("max_seq_length", "batch_size", "grad_accum", "log_every", "keep_checkpoints", "relation_heads",
            "learning_rate", "adam_eps", "temperature")
NOT_NEGATIVE = ("eval_every", "save_every", "max_train_examples", "max_eval_examples", "epochs", "max_steps",
                "weight_decay", "max_grad_norm", "warmup_ratio", "heldout_fraction")


def _check_type(key: str, value, label: str | None = None):
    hint = HINTS[key]
    numeric = hint is float or float in typing.get_args(hint)
    if numeric and isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if not _matches(value, hint):
        raise RecipeError(f"recipe key {label or key}: expected {_type_name(hint)}, got {value!r} "
                          f"({type(value).__name__})")
    return float(value) if numeric and _matches(value, int) else value


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is Literal:  # a string here; Recipe.__post_init__ says which strings
        return isinstance(value, str)
    if hint in (int, float):  # True is an int to Python, not to a recipe
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    return isinstance(value, origin or hint)  # dict[...] is any dict


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "str"
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")


def _unknown(key: str, prefix: str = "", known=FIELDS) -> RecipeError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(known)}"
    return RecipeError(f"unknown recipe key {prefix + key!r}{hint}")


def recipe_path(name_or_path: str) -> Path:
    """A bundled recipe by name (general, task, finetune) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        return path
    bundled = RECIPE_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise RecipeError(f"unknown recipe {name_or_path!r}; use one of {', '.join(names)} or a path to a YAML file")
    return bundled


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not key=value (e.g. learning_rate=1e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set(data: dict, dotted: str, value):
    top, *rest = dotted.split(".")
    if top not in FIELDS:
        raise _unknown(top)
    if not rest:
        data[top] = value
        for stage in STAGES:  # an override without a stage prefix is meant for every stage
            if isinstance(data.get(stage), dict):
                data[stage].pop(top, None)
        return
    if top not in ("terms", "deepspeed", "task_epochs", *STAGES):
        raise RecipeError(f"recipe key {top} is not a mapping; write {top}=VALUE")
    if data.get(top) is None:  # start from the default mapping, so terms.attention=0 keeps the other terms
        data[top] = getattr(Recipe(), top) or {}
    if top == "deepspeed" and isinstance(data[top], str):  # `deepspeed=zero2-bf16.json deepspeed.x.y=1`
        data[top] = _read_json(data[top])
    node = data[top]
    for depth, part in enumerate(rest):
        if not isinstance(node, dict):
            raise RecipeError(f"recipe key {dotted}: {'.'.join([top, *rest[:depth]])} is {node!r}, not a mapping")
        if depth < len(rest) - 1:
            node = node.setdefault(part, {})
    node[rest[-1]] = value


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """Read a recipe, apply `key=value` overrides, and check every key."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must be a mapping of recipe keys")
    return build_recipe(data, overrides)


def build_recipe(data: dict, overrides: list[str] = (), **values) -> Recipe:
    """A recipe from a mapping of recipe keys, then `values` (keyword arguments; None: unset), then `overrides`."""
    data = copy.deepcopy(data)
    for key in data:
        if key not in FIELDS:
            raise _unknown(key)
    for key, value in values.items():
        if value is not None:
            _set(data, key, value)
    for text in overrides:
        _set(data, *parse_override(text))
    data = {key: _check_type(key, value) for key, value in data.items()}
    if isinstance(data.get("deepspeed"), str):
        data["deepspeed"] = _read_json(data["deepspeed"])
    return Recipe(**data)


def _read_json(name: str) -> dict:
    # The bundled configs live in recipes/deepspeed/; `zero2-bf16.json` and `deepspeed/zero2-bf16.json` both work.
    candidates = (Path(name), RECIPE_DIR / name, RECIPE_DIR / "deepspeed" / name)
    if (path := next((p for p in candidates if p.is_file()), None)) is None:
        raise RecipeError(f"recipe key deepspeed: no JSON file {name} (looked in the current directory, in "
                          f"{RECIPE_DIR} and in {RECIPE_DIR / 'deepspeed'})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"recipe key deepspeed: {path} is not valid JSON ({e})") from None
