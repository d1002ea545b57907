"""Recipes: validated on load, errors name file and key, --set overrides."""

import pytest

from medcritical.recipe import RecipeError, load_recipe

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_sane():
    recipe = load_recipe()
    assert recipe.evaluate.protocol == "mcq"
    assert recipe.selfplay.dpo.settings["beta"] == 0.3  # the paper's value
    assert recipe.data.source == "bundled" and recipe.model.base == "tiny"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_loads(name):
    load_recipe(REPO / "recipes" / name)


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "sft:\n  lora:\n    rank: 8\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(path) in str(error.value) and "sft.lora.rank: unknown key" in str(error.value)


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(RecipeError, match=r"selfplay\.rounds: .*integer.*'two'"):
        load_recipe(write(tmp_path, "selfplay:\n  rounds: two\n"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.source: .*no such file 'missing\.csv'"):
        load_recipe(write(tmp_path, "data:\n  source: missing.csv\n"))
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "absent.yaml")


def test_set_overrides_parse_yaml_values(tmp_path):
    recipe = load_recipe(write(tmp_path, "sft:\n  lora:\n    r: 8\n"), ["sft.lora.r=16", "run.name=x", "data.train_size=null"])
    assert recipe.sft.lora.r == 16 and recipe.run.name == "x" and recipe.data.train_size is None
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        load_recipe(None, ["sft.lora.r"])
    with pytest.raises(RecipeError, match="with --set selfplay.nope=1"):
        load_recipe(None, ["selfplay.nope=1"])


def test_trainer_mapping_goes_to_trl_typed_and_checked(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", ["sft.trainer.learning_rate=3e-3", "sft.trainer.packing=true"])
    assert recipe.sft.settings["learning_rate"] == 0.003  # YAML reads 3e-3 as text; TRL's type makes it a float
    assert recipe.sft.settings["packing"] is True and recipe.sft.settings["assistant_only_loss"] is True
    for bad, message in [
        ("sft.trainer.learnin_rate=1e-3", r"sft.trainer: .*'learnin_rate' is not a field of trl.SFTConfig"),
        ("sft.trainer.learning_rate=-1e-3", r"sft.trainer: .*learning_rate must be > 0"),
        ("selfplay.dpo.trainer.num_train_epochs=abc", r"selfplay.dpo.trainer: .*num_train_epochs: 'abc' is not a valid float"),
        ("selfplay.dpo.trainer.output_dir=/tmp/x", r"output_dir cannot be set here"),
        ("sft.trainer.lr_scheduler_type=cosne", r"trl.SFTConfig refuses these settings: cosne is not a valid SchedulerType"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(REPO / "recipes" / "demo.yaml", [bad])
