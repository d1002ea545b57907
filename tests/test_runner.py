"""The stage contract and its one runner: declarations, inputs by declaration, model resolution, skipped
DPO rounds, missing inputs (the KFP side: test_kfp_runtime.py)."""

import shutil
from pathlib import Path

import pytest

from medcritical.orchestration import staging
from medcritical.orchestration.recipe import load_recipe_text
from medcritical.orchestration.runner import STAGES, run_stage
from medcritical.selfplay.stage import DPO


def test_every_stage_declares_its_contract_and_data_flows_one_way():
    order = list(STAGES)
    assert order == ["prepare_data", "distill", "sft", "rollout", "dpo", "evaluate", "report"]
    for position, stage in enumerate(STAGES.values()):
        assert stage.stats in stage.outputs, stage.name
        assert stage.fingerprint is None or stage.fingerprint in stage.outputs, stage.name
        assert set(stage.local_only) <= set(stage.outputs), stage.name
        for name, spec in stage.inputs.items():
            if spec.default_stage:  # a default input comes from an earlier stage, and is a file it writes
                assert order.index(spec.default_stage) < position, (stage.name, name)
                assert spec.file in STAGES[spec.default_stage].outputs, (stage.name, name)
            if spec.beside:
                assert spec.beside in stage.inputs, (stage.name, name)


def test_the_runner_refuses_an_input_the_stage_does_not_declare(tmp_path):
    with pytest.raises(TypeError, match="no input or option pairs"):
        run_stage(DPO, load_recipe_text(""), str(tmp_path / "dpo"), pairs="x")


def _hf_folder(path: Path, model: Path) -> Path:
    """A copy of a real (tiny) model: a model input is checked loadable before it is used."""
    shutil.copytree(model, path)
    return path


def test_a_step_folder_resolves_to_its_model(tmp_path, tiny_model):
    recipe = load_recipe_text("")
    _hf_folder(tmp_path / "sft" / "model", tiny_model)
    assert staging.resolve_model_uri(recipe, str(tmp_path / "sft")) == tmp_path / "sft" / "model"
    assert staging.resolve_model_uri(recipe, str(tmp_path / "sft" / "model")) == tmp_path / "sft" / "model"


def test_dpo_without_pairs_points_to_the_model_it_kept(tmp_path, tiny_model):
    recipe = load_recipe_text("")
    _hf_folder(tmp_path / "sft" / "model", tiny_model)
    rollout = tmp_path / "rollout"
    rollout.mkdir()
    (rollout / "pairs.jsonl").write_text("")
    result = run_stage(DPO, recipe, str(tmp_path / "dpo"), rollout=str(rollout), model=str(tmp_path / "sft"))
    assert result["status"] == "skipped"
    assert (tmp_path / "dpo" / staging.MODEL_POINTER).read_text() == str(tmp_path / "sft")
    # The next round and the final evaluation load the unchanged SFT model through the pointer.
    assert staging.resolve_model_uri(recipe, str(tmp_path / "dpo")) == tmp_path / "sft" / "model"


def test_missing_input_names_the_step_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the step that writes it first"):
        staging.input_file(str(tmp_path / "distill"), "sft.jsonl")
    (tmp_path / "distill").mkdir()
    with pytest.raises(FileNotFoundError, match="no sft.jsonl there"):
        staging.input_file(str(tmp_path / "distill"), "sft.jsonl")


def test_the_stage_command_offers_every_declared_stage():
    from medcritical.cli import build_parser, main

    parser = build_parser()
    for name in STAGES:
        assert parser.parse_args(["stage", name, "--output", "x"]).name == name
    # An unknown name is refused when the command runs, naming the declared stages (tests/test_cli_errors.py).
    assert main(["stage", "nonsense", "--output", "x"]) == 2
