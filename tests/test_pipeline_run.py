"""The whole pipeline through KFP's local runner, every artifact in the real S3 server.

The same components the cluster runs (prepare-data → distill → SFT → rollout → DPO → evaluations →
report), each in its own process, on a tiny model and 16 questions: what `medcritical run` does.
"""

import json
import tempfile
from pathlib import Path

import pytest

from medcritical import storage
from medcritical.orchestration.recipe import load_recipe_text
from medcritical.platform.local_run import run_locally

pytestmark = pytest.mark.slow  # end-to-end: left out of the quick lane (README, Tests)

RECIPE = """
run: {{name: e2e, output_dir: "s3://{bucket}/runs/e2e", threads: 1}}
data: {{eval_size: 8, train_size: 16}}
generation: {{batch_size: 16, max_new_tokens: 24}}
distill: {{explanation_max_chars: 20}}
sft:
  lora: {{enabled: false}}
  trainer: {{learning_rate: 3.0e-3, num_train_epochs: 1, per_device_train_batch_size: 8, max_length: 512, logging_steps: 1}}
selfplay:
  rounds: 1
  rollout: {{samples_per_question: 2, max_new_tokens: 24}}
  correction: {{attempts: 1}}
  dpo:
    lora: {{enabled: false}}
    trainer: {{num_train_epochs: 1, per_device_train_batch_size: 2, max_length: 512, logging_steps: 1}}
"""


def test_whole_pipeline_runs_locally_with_s3_artifacts(s3_env, s3_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # KFP's local pipeline_root: tmp_path/kfp-*
    bucket = s3_env
    recipe = load_recipe_text(RECIPE.format(bucket=bucket))

    report_dir = run_locally(recipe)

    # The console follows the steps; KFP's executor JSON goes only to the log file.
    console = capsys.readouterr().out
    assert "sft ..." in console and "sft: success" in console and "pipeline: success" in console
    assert f"step sft -> s3://{bucket}/runs/e2e/sft" in console
    assert "executor_input" not in console and "outputFile" not in console
    # Every stage ran in a fork of the warm worker (torch, transformers and TRL imported once for the run):
    # data, distill, SFT, rollout, DPO, three evaluations and the report.
    assert console.count("running in a fork") == 9, console

    report = json.loads((report_dir / "report.json").read_text())
    assert report["protocol"] == "mcq"
    assert {"accuracy_base", "accuracy_sft", "accuracy_dpo"} <= report.keys()
    assert all(report["evaluations"][name]["n"] == 8 for name in ("base", "sft", "dpo"))
    steps_stats = report["steps"]
    assert steps_stats["data"]["train"] == 16
    assert steps_stats["distill"]["accepted"] > 0
    assert steps_stats["sft"]["steps"] >= 1 and steps_stats["sft"]["loss_first"] > 0
    assert steps_stats["rounds"][0]["rollout"]["rollout"]["samples"] == 32
    assert steps_stats["rounds"][0]["dpo"]["status"] in {"trained", "skipped"}
    markdown = (report_dir / "report.md").read_text()
    assert "| sft |" in markdown and "| not run |" not in markdown  # every model evaluated, every step's stats read
    assert (report_dir / "models.png").stat().st_size > 0

    # Every step published its folder to the bucket, each with its manifest.
    names = {o.object_name for o in s3_server.client().list_objects(bucket, prefix="runs/e2e/", recursive=True)}
    for step in (
        "data",
        "distill",
        "sft",
        "round1-rollout",
        "round1-dpo",
        "eval-base",
        "eval-sft",
        "eval-dpo-round1",
        "report",
    ):
        assert f"runs/e2e/{step}/{storage.MANIFEST_NAME}" in names, step
    assert "runs/e2e/sft/model/config.json" in names
    # A trained round publishes its model; a round without pairs, the pointer to the model it kept.
    assert "runs/e2e/round1-dpo/model/config.json" in names or "runs/e2e/round1-dpo/model.uri" in names

    # The steps handed each other artifacts naming their folders in the bucket; KFP's own artifact paths
    # stayed empty (no bytes through KFP's artifact store).
    outputs = {
        path.parent.name: json.loads(path.read_text()).get("artifacts", {})
        for path in tmp_path.glob("kfp-*/*/*/executor_output.json")
    }
    root = f"s3://{bucket}/runs/e2e"
    expected = {
        ("prepare-data", "data"): "data",
        ("distill", "traces"): "distill",
        ("sft", "model"): "sft",
        ("rollout", "pairs"): "round1-rollout",
        ("dpo", "model"): "round1-dpo",
        ("evaluate", "metrics"): "eval-base",
        ("evaluate-3", "metrics"): "eval-dpo-round1",
        ("report", "summary"): "report",
    }
    for (task, output), folder in expected.items():
        (artifact,) = outputs[task][output]["artifacts"]
        assert artifact["metadata"]["location"] == f"{root}/{folder}", (task, output)
        if output != "summary":  # the report's Markdown is shown in the KFP UI, so it is written there
            assert not Path(artifact["uri"]).exists(), (task, output)
    assert outputs["evaluate-3"]["metrics"]["artifacts"][0]["metadata"]["accuracy"] >= 0
