"""The KFP glue (medcritical.platform.kfp_runtime): the run root of a pipeline, numbers for the KFP UI, the
data-parallel relaunch of a training step."""

import json
from pathlib import Path

import pytest

from medcritical.orchestration.recipe import dump_recipe, load_recipe_text
from medcritical.platform import kfp_runtime
from medcritical.selfplay.stage import DPO
from medcritical.training.stage import SFT


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
        base_eval=str(run_root / "eval-base"),
        sft_eval=str(run_root / "eval-sft"),
        dpo_eval=str(run_root / "eval-dpo-round1"),
    )
    report = (Path(output) / "report.md").read_text()
    assert output == f"{run_root}/report"
    assert "data: train=7, eval=3" in report and "| sft | not run |" in report
    assert metrics.logged == {"accuracy_base": 0.5}


def test_training_steps_relaunch_under_torchrun_with_one_process_per_gpu():
    command = kfp_runtime.data_parallel_command(
        SFT, "/tmp/recipe.yaml", "s3://b/run/sft", {"distill": "s3://b/run/distill", "model": ""}, 8
    )
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert command[5:] == [
        "-m",
        "medcritical.cli",
        "stage",
        "sft",
        "--recipe",
        "/tmp/recipe.yaml",
        "--input",
        "distill=s3://b/run/distill",
        "--output",
        "s3://b/run/sft",
    ]
    command = kfp_runtime.data_parallel_command(
        DPO, "/r.yaml", "/run/dpo", {"rollout": "/run/rollout", "model": "/run/sft"}, 2
    )
    assert command[-6:] == ["--input", "rollout=/run/rollout", "--input", "model=/run/sft", "--output", "/run/dpo"]
    # The CLI accepts exactly these arguments.
    from medcritical.cli import build_parser

    args = build_parser().parse_args(command[7:])
    assert (args.name, args.inputs, args.output) == ("dpo", ["rollout=/run/rollout", "model=/run/sft"], "/run/dpo")


def test_the_stage_command_names_a_wrong_input(tmp_path, capsys):
    from medcritical.cli import main

    assert main(["stage", "dpo", "--input", "pairs=x", "--output", str(tmp_path / "dpo")]) == 2
    assert "rollout, heldout, rollouts, model, data" in capsys.readouterr().err


def test_artifacts_carry_their_step_folder_in_metadata():
    from kfp import dsl

    model = dsl.Model(name="model", uri="minio://mlpipeline/v2/artifacts/run/sft/model")
    kfp_runtime.record_location(model, "s3://bucket/runs/x/sft")
    assert model.metadata == {"location": "s3://bucket/runs/x/sft"}
    assert model.uri.startswith("minio://")  # KFP's own artifact: nothing is uploaded or downloaded
    assert kfp_runtime.location_of(model) == "s3://bucket/runs/x/sft"
    assert kfp_runtime.location_of(None) == ""  # an optional input left out: the recipe's model.base
    foreign = dsl.Dataset(name="data", uri="s3://elsewhere/data")
    with pytest.raises(ValueError, match="names no step folder"):
        kfp_runtime.location_of(foreign)


def test_the_report_reads_reused_traces_statistics_from_the_run_they_came_from(tmp_path):
    """With distill_uri the distill task's output is an earlier run's folder: the report reads its statistics
    there (the report declares the distill input), not under this run's root, where it said "not run"."""
    run_root, earlier = tmp_path / "run-2", tmp_path / "run-1" / "distill"
    earlier.mkdir(parents=True)
    stats = {"questions": 9, "accepted": 8, "acceptance_rate": 0.889, "trace_attempts": 9}
    (earlier / "distill_stats.json").write_text(json.dumps(stats))
    recipe_yaml = dump_recipe(load_recipe_text("{}"))
    output = kfp_runtime.run_component_step(
        "report", recipe_yaml, str(run_root), "report", _Metrics(), distill=str(earlier)
    )
    report = (Path(output) / "report.md").read_text()
    assert "- distill: questions=9, accepted=8" in report, report
