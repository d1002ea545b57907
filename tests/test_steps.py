"""The URI-level steps: model resolution, skipped DPO rounds, missing inputs."""

from pathlib import Path

import pytest

from medcritical import steps
from medcritical.recipe import load_recipe_text


def _hf_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_a_step_folder_resolves_to_its_model(tmp_path):
    recipe = load_recipe_text("")
    _hf_folder(tmp_path / "sft" / "model")
    assert steps.resolve_model_uri(recipe, str(tmp_path / "sft")) == tmp_path / "sft" / "model"
    assert steps.resolve_model_uri(recipe, str(tmp_path / "sft" / "model")) == tmp_path / "sft" / "model"


def test_dpo_without_pairs_points_to_the_model_it_kept(tmp_path):
    recipe = load_recipe_text("")
    _hf_folder(tmp_path / "sft" / "model")
    rollout = tmp_path / "rollout"
    rollout.mkdir()
    (rollout / "pairs.jsonl").write_text("")
    result = steps.dpo(recipe, str(rollout), str(tmp_path / "sft"), str(tmp_path / "dpo"))
    assert result["status"] == "skipped"
    assert (tmp_path / "dpo" / steps.MODEL_POINTER).read_text() == str(tmp_path / "sft")
    # The next round and the final evaluation load the unchanged SFT model through the pointer.
    assert steps.resolve_model_uri(recipe, str(tmp_path / "dpo")) == tmp_path / "sft" / "model"


def test_missing_input_names_the_step_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the step that writes it first"):
        steps.input_file(str(tmp_path / "distill"), "sft.jsonl")
    (tmp_path / "distill").mkdir()
    with pytest.raises(FileNotFoundError, match="no sft.jsonl there"):
        steps.input_file(str(tmp_path / "distill"), "sft.jsonl")
