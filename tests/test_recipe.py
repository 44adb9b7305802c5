"""Recipes: every bundled YAML loads; `key=value` overrides (dotted keys into terms/deepspeed) are type-checked the
same way as the files; unknown keys, wrong types and bad choices are RecipeErrors that say how to fix them."""

import json
import textwrap

import pytest

from tinybert.recipe import FIELDS, RECIPE_DIR, Recipe, RecipeError, build_recipe, load_recipe, recipe_path

BUNDLED = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def test_general_recipe_is_bundled():
    assert "general" in BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipes_load_and_set_only_known_keys(name):
    recipe = load_recipe(name)
    # general-minilmv2.yaml is a general recipe: a bundled file is named after its kind, or kind-variant.
    assert isinstance(recipe, Recipe) and name.split("-")[0] == recipe.recipe
    # Each file is headed by the command that runs it.
    header = (RECIPE_DIR / f"{name}.yaml").read_text().splitlines()[:4]
    assert any("tinybert" in line for line in header if line.startswith("#")), header
    # By name and by path alike.
    assert load_recipe(str(recipe_path(name))) == recipe


def test_general_recipe_values_follow_the_paper():
    recipe = load_recipe("general")
    assert (recipe.batch_size, recipe.max_seq_length, recipe.epochs) == (256, 128, 3.0)
    assert recipe.learning_rate == pytest.approx(5e-5) and isinstance(recipe.learning_rate, float)
    assert recipe.terms == {"embedding": 1.0, "hidden": 1.0, "attention": 1.0}
    assert recipe.layer_map == "uniform" and recipe.deepspeed is None


def test_overrides_plain_and_dotted():
    recipe = load_recipe("general", [
        "learning_rate=5e-4",  # YAML 1.1 reads 5e-4 (no dot) as a string: still a float
        "batch_size=8", "max_seq_length=64", "max_steps=20", "layer_map=[0, 2, 3, 5, 6]",
        "terms.attention=0", "adam_betas=[0.9, 0.98]", "precision=fp32",
    ])
    assert recipe.learning_rate == 5e-4 and isinstance(recipe.learning_rate, float)
    assert (recipe.batch_size, recipe.max_seq_length, recipe.max_steps) == (8, 64, 20)
    assert recipe.layer_map == [0, 2, 3, 5, 6]
    assert recipe.terms == {"embedding": 1.0, "hidden": 1.0, "attention": 0}  # the other terms are kept
    assert recipe.adam_betas == [0.9, 0.98] and recipe.precision == "fp32"
    # An int where a float is expected is widened.
    assert load_recipe("general", ["warmup_ratio=0"]).warmup_ratio == 0.0
    assert isinstance(load_recipe("general", ["warmup_ratio=0"]).warmup_ratio, float)


def test_dotted_overrides_build_a_deepspeed_block():
    recipe = load_recipe("general", ["deepspeed.zero_optimization.stage=2", "deepspeed.bf16.enabled=true"])
    assert recipe.deepspeed == {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}


def test_deepspeed_json_by_bare_name_or_path_then_overridden(tmp_path, monkeypatch):
    bundled = json.loads((RECIPE_DIR / "deepspeed" / "zero2-bf16.json").read_text())
    for name in ("zero2-bf16.json", "deepspeed/zero2-bf16.json", str(RECIPE_DIR / "deepspeed" / "zero2-bf16.json")):
        assert load_recipe("general", [f"deepspeed={name}"]).deepspeed == bundled, name
    # A file given then one of its keys overridden (the file is read first, then the key set inside it).
    recipe = load_recipe("general", ["deepspeed=zero2-bf16.json", "deepspeed.zero_optimization.stage=1"])
    assert recipe.deepspeed == {**bundled, "zero_optimization": {"stage": 1}}
    # A YAML recipe whose `deepspeed:` names a JSON file relative to the current directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    (tmp_path / "mine.yaml").write_text("recipe: general\nbatch_size: 16\ndeepspeed: mine.json\n")
    recipe = load_recipe(str(tmp_path / "mine.yaml"))
    assert recipe.deepspeed == {"zero_optimization": {"stage": 1}} and recipe.batch_size == 16
    with pytest.raises(RecipeError, match="no JSON file nope.json"):
        load_recipe("general", ["deepspeed=nope.json"])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe("general", ["deepspeed=broken.json"])


def test_a_yaml_path_recipe(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(textwrap.dedent("""\
        recipe: general
        batch_size: 8
        learning_rate: 1e-4
        terms: {embedding: 1, hidden: 2}
    """))
    recipe = load_recipe(str(path), ["terms.attention=0.5"])
    assert recipe.batch_size == 8 and recipe.learning_rate == 1e-4
    assert recipe.terms == {"embedding": 1, "hidden": 2, "attention": 0.5}
    # Keys not in the file keep the dataclass defaults.
    assert recipe.seed == Recipe().seed


@pytest.mark.parametrize("override, message", [
    ("learnig_rate=1e-4", "unknown recipe key 'learnig_rate'; did you mean learning_rate?"),
    ("batchsize=8", "did you mean batch_size?"),
    ("max_seq_len=64", "did you mean max_seq_length?"),
    ("zzzzzz=1", "unknown recipe key 'zzzzzz'; known keys: "),
    ("terms.prediktion=1", "terms.prediktion: unknown loss term"),
    ("seed.x=1", "recipe key seed is not a mapping"),
    ("terms.attention.x=1", "terms.attention is 1.0, not a mapping"),
    ("no_equals_sign", "is not key=value"),
])
def test_unknown_keys(override, message):
    with pytest.raises(RecipeError) as error:
        load_recipe("general", [override])
    assert message in str(error.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("recipe: general\nwarmup_ratoi: 0.1\n")
    with pytest.raises(RecipeError, match="unknown recipe key 'warmup_ratoi'; did you mean warmup_ratio"):
        load_recipe(str(path))


@pytest.mark.parametrize("override, message", [
    ("batch_size=eight", "recipe key batch_size: expected int, got 'eight' (str)"),
    ("batch_size=8.5", "recipe key batch_size: expected int, got 8.5 (float)"),
    ("max_steps=true", "recipe key max_steps: expected int, got True (bool)"),
    ("learning_rate=fast", "recipe key learning_rate: expected float"),
    ("learning_rate=[1]", "recipe key learning_rate: expected float"),
    ("shared_projection=1", "recipe key shared_projection: expected bool"),
    ("adam_betas=0.9", "recipe key adam_betas: expected list"),
    ("layer_map=[0, two, 4]", "recipe key layer_map: expected"),
    ("terms=5", "recipe key terms: expected dict"),
    ("terms.attention=lots", "recipe key terms.attention: weight must be a number"),
])
def test_wrong_types(override, message):
    with pytest.raises(RecipeError) as error:
        load_recipe("general", [override])
    assert message in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("precision=fp16", "recipe key precision: 'fp16' is not one of"),
    ("attention_mode=padded", "recipe key attention_mode: 'padded' is not one of masked, original"),
    ("prediction=kl", "recipe key prediction: 'kl' is not one of"),
    ("recipe=pretrain", "recipe key recipe: 'pretrain' is not one of"),
    ("layer_map=top", "layer_map: give 'uniform' or a list"),
    ("batch_size=0", "batch_size must be positive"),
    ("grad_accum=3", "batch_size 256 is not divisible by grad_accum 3"),
])
def test_bad_choices_and_values(override, message):
    with pytest.raises(RecipeError) as error:
        load_recipe("general", [override])
    assert message in str(error.value)


def test_unknown_recipe_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'generall'; use one of .*general"):
        load_recipe("generall")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(str(tmp_path / "list.yaml"))
    (tmp_path / "bad.yaml").write_text("batch_size: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(tmp_path / "bad.yaml"))


def test_build_recipe_does_not_mutate_its_input():
    data = {"recipe": "general", "terms": {"embedding": 1.0, "hidden": 1.0, "attention": 1.0}}
    build_recipe(data, ["terms.attention=0"])
    assert data["terms"]["attention"] == 1.0


def test_every_field_is_documented_in_the_general_recipe():
    """The bundled general.yaml lists every key a general recipe uses, so users see each one with its comment."""
    text = (RECIPE_DIR / "general.yaml").read_text()
    task_only = {"task_epochs", "max_train_examples", "max_eval_examples", "stage1", "stage2", "prediction",
                 "temperature", "soft_mode"}
    missing = [key for key in FIELDS if key not in task_only and f"\n{key}:" not in text]
    assert not missing, missing


def test_minilm_relation_keys():
    recipe = load_recipe("general-minilmv2")
    assert recipe.terms == {"q_relation": 1.0, "k_relation": 1.0, "v_relation": 1.0}
    assert (recipe.relation_heads, recipe.teacher_layer) == (12, None)
    # Mixable with TinyBERT's terms, in general and task recipes (and per stage).
    mixed = load_recipe("general", ["terms.attention_relation=1", "terms.value_relation=0.5", "teacher_layer=5",
                                    "relation_heads=16"])
    assert mixed.terms == {"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "attention_relation": 1,
                           "value_relation": 0.5}
    assert (mixed.relation_heads, mixed.teacher_layer) == (16, 5)
    task = load_recipe("task", ["stage1.terms={hidden: 1, q_relation: 1, k_relation: 1, v_relation: 1}",
                                "stage1.teacher_layer=map"])
    assert task.stage("stage1").teacher_layer == "map" and "v_relation" in task.stage("stage1").terms
    assert load_recipe("general", ["teacher_layer=null"]).teacher_layer is None


@pytest.mark.parametrize("override, message", [
    ("relation_heads=0", "relation_heads must be positive"),
    ("relation_heads=1.5", "recipe key relation_heads: expected int"),
    ("teacher_layer=last", "recipe key teacher_layer: 'last' is not a teacher layer; give a layer number from 1, "
                           "null (the teacher's last) or 'map'"),
    ("teacher_layer=0", "recipe key teacher_layer: 0 is not a teacher layer"),
    ("terms.qq_relation=1", "recipe key terms.qq_relation: unknown loss term; use embedding, hidden, attention, "
                            "prediction, attention_relation, value_relation, q_relation, k_relation, v_relation"),
])
def test_bad_relation_keys(override, message):
    with pytest.raises(RecipeError) as error:
        load_recipe("general", [override])
    assert message in str(error.value)
