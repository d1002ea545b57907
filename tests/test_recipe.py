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
    assert recipe.selfplay.dpo.beta == 0.3  # the paper's value
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
