"""The stage contract and its one runner: declarations, model resolution, skipped DPO rounds, component
glue, data-parallel launch."""

import json
from pathlib import Path

import pytest

from medcritical import kfp_runtime, staging
from medcritical.recipe import dump_recipe, load_recipe_text
from medcritical.runner import STAGES, run_stage
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


def _hf_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_a_step_folder_resolves_to_its_model(tmp_path):
    recipe = load_recipe_text("")
    _hf_folder(tmp_path / "sft" / "model")
    assert staging.resolve_model_uri(recipe, str(tmp_path / "sft")) == tmp_path / "sft" / "model"
    assert staging.resolve_model_uri(recipe, str(tmp_path / "sft" / "model")) == tmp_path / "sft" / "model"


def test_dpo_without_pairs_points_to_the_model_it_kept(tmp_path):
    recipe = load_recipe_text("")
    _hf_folder(tmp_path / "sft" / "model")
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


def test_numeric_metrics_flatten_nested_statistics():
    result = {
        "rollout": {"pass@1": 0.25, "questions": 4},
        "pairs": {"train_pairs": 3},
        "ok": True,
        "name": "x",
        "loss_curve": [{"step": 1, "loss": 2.0}],
    }
    assert kfp_runtime.numeric_metrics(result) == {
        "rollout.pass@1": 0.25,
        "rollout.questions": 4,
        "pairs.train_pairs": 3,
    }


class _Metrics:
    def __init__(self):
        self.logged = {}

    def log_metric(self, key, value):
        self.logged[key] = value


def test_component_step_uses_the_pipeline_run_root(tmp_path):
    """The report reads the steps' statistics under the run_root parameter, not the recipe's output_dir."""
    run_root = tmp_path / "cluster-run"
    (run_root / "data").mkdir(parents=True)
    (run_root / "data" / "data_stats.json").write_text(json.dumps({"train": 7, "eval": 3, "bad_rows": []}))
    (run_root / "eval-base").mkdir()
    (run_root / "eval-base" / "report.json").write_text(
        json.dumps({"accuracy": 0.5, "ci95": [0.1, 0.9], "correct": 1, "n": 2, "protocol": "mcq"})
    )
    recipe_yaml = dump_recipe(load_recipe_text(f"run: {{output_dir: {tmp_path / 'elsewhere'}}}"))
    metrics = _Metrics()
    output = kfp_runtime.run_component_step(
        "report",
        recipe_yaml,
        str(run_root),
        "report",
        metrics,
        base_eval_uri=str(run_root / "eval-base"),
        sft_eval_uri=str(run_root / "eval-sft"),
        dpo_eval_uri=str(run_root / "eval-dpo-round1"),
    )
    report = (Path(output) / "report.md").read_text()
    assert output == f"{run_root}/report"
    assert "data: train=7, eval=3" in report and "| sft | not run |" in report
    assert metrics.logged == {"accuracy_base": 0.5}


def test_training_steps_relaunch_under_torchrun_with_one_process_per_gpu():
    command = kfp_runtime.data_parallel_command(
        "sft", "/tmp/recipe.yaml", "s3://b/run/sft", {"distill_uri": "s3://b/run/distill", "model_uri": ""}, 8
    )
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert command[5:] == [
        "-m",
        "medcritical.cli",
        "sft",
        "--recipe",
        "/tmp/recipe.yaml",
        "--dataset",
        "s3://b/run/distill",
        "--output",
        "s3://b/run/sft",
    ]
    command = kfp_runtime.data_parallel_command(
        "dpo", "/r.yaml", "/run/dpo", {"rollout_uri": "/run/rollout", "model_uri": "/run/sft"}, 2
    )
    assert command[-6:] == ["--pairs", "/run/rollout", "--output", "/run/dpo", "--model", "/run/sft"]
    # The CLI accepts exactly these arguments.
    from medcritical.cli import build_parser

    args = build_parser().parse_args(command[7:])
    assert (args.pairs, args.model, args.output) == ("/run/rollout", "/run/sft", "/run/dpo")
