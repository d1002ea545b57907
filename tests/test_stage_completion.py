"""The runner decides completion from the declaration (medcritical.core.stage): a folder holding every required
output, a whole done marker and the fingerprint this run would record is not run again; its stored statistics
come back. Anything less (an output missing, another setting, `restart`) runs the stage."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from medcritical import storage
from medcritical.core.stage import Stage
from medcritical.data.cmexam import write_questions
from medcritical.evaluation.evaluate import evaluation_fingerprint
from medcritical.evaluation.stage import EVALUATE
from medcritical.io.fingerprint import FINGERPRINT_FILE
from medcritical.io.manifest import write_manifest
from medcritical.orchestration.recipe import load_recipe_text
from medcritical.orchestration.runner import STAGES, run_stage
from medcritical.selfplay.stage import DPO
from medcritical.training.fingerprints import dpo_fingerprint, sft_fingerprint
from medcritical.training.stage import SFT
from tests.fixtures.s3 import s3_env, s3_server  # noqa: F401
from tests.fixtures.sft import short_questions, write_sft_dataset


def test_every_declaration_states_what_a_finished_run_holds():
    for stage in STAGES.values():
        assert set(stage.optional) <= set(stage.outputs), stage.name
        assert stage.stats in stage.required_outputs, stage.name  # the statistics a finished run returns
        assert stage.expected_fingerprint is None or stage.fingerprint in stage.required_outputs, stage.name
        assert set(stage.extra_stats.values()) <= set(stage.outputs), stage.name
    # Every training stage, and evaluation, is decided by the runner.
    assert {s.name for s in STAGES.values() if s.expected_fingerprint} >= {"sft", "dpo", "evaluate"}


class Calls:
    """A stage's run function that writes a finished run (outputs, fingerprint, statistics) and counts its calls."""

    def __init__(self):
        self.count = 0

    def __call__(self, recipe, output_dir: Path, restart: bool = False) -> dict:
        self.count += 1
        (output_dir / "result.txt").write_text(f"run {self.count}")
        (output_dir / FINGERPRINT_FILE).write_text(json.dumps({"seed": recipe.run.seed}))
        stats = {"run": self.count, "seed": recipe.run.seed}
        (output_dir / "stats.json").write_text(json.dumps(stats))
        return stats


def fake_stage(run) -> Stage:
    return Stage(
        name="fake",
        folder="fake",
        section="run",
        run=run,
        inputs={},
        outputs=("result.txt", "plot.png", FINGERPRINT_FILE, "stats.json"),
        stats="stats.json",
        fingerprint=FINGERPRINT_FILE,
        options=("restart",),
        optional=("plot.png",),  # never written by Calls: a finished run without it is still finished
        expected_fingerprint=lambda recipe, **_: {"seed": recipe.run.seed},
    )


def test_a_finished_folder_is_not_run_again_and_anything_less_is(tmp_path):
    run = Calls()
    stage, recipe, out = fake_stage(run), load_recipe_text(""), tmp_path / "fake"
    assert run_stage(stage, recipe, str(out)) == {"run": 1, "seed": recipe.run.seed}
    assert run_stage(stage, recipe, str(out)) == {"run": 1, "seed": recipe.run.seed} and run.count == 1
    (out / "result.txt").unlink()  # a declared output missing: run again
    assert run_stage(stage, recipe, str(out))["run"] == 2
    assert run_stage(stage, recipe, str(out), restart=True)["run"] == 3  # restart always runs
    other = load_recipe_text("run: {seed: 7}")  # another setting: the fingerprint differs, run again
    assert run_stage(stage, other, str(out)) == {"run": 4, "seed": 7}
    assert run_stage(stage, other, str(out))["run"] == 4


def test_a_folder_changed_after_its_manifest_is_not_finished(tmp_path):
    run = Calls()
    stage, recipe, out = fake_stage(run), load_recipe_text(""), tmp_path / "fake"
    run_stage(stage, recipe, str(out))
    write_manifest(out, [out / "result.txt"])
    assert run_stage(stage, recipe, str(out))["run"] == 1
    (out / "result.txt").write_text("changed since")
    assert run_stage(stage, recipe, str(out))["run"] == 2


def test_a_stage_without_an_expected_fingerprint_runs_every_time(tmp_path):
    run = Calls()
    stage = dataclasses.replace(fake_stage(run), expected_fingerprint=None)
    run_stage(stage, load_recipe_text(""), str(tmp_path / "fake"))
    assert run_stage(stage, load_recipe_text(""), str(tmp_path / "fake"))["run"] == 2


def test_a_finished_s3_folder_is_read_from_its_manifest_not_run_again(tmp_path, s3_env, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    run = Calls()
    stage, recipe, uri = fake_stage(run), load_recipe_text(""), f"s3://{s3_env}/run/fake"
    assert run_stage(stage, recipe, uri)["run"] == 1
    shutil.rmtree(tmp_path / "work")  # a new machine: nothing of the first run on its disk
    monkeypatch.setattr(storage, "materialize", None)  # nothing is downloaded to decide
    assert run_stage(stage, recipe, uri) == {"run": 1, "seed": recipe.run.seed} and run.count == 1
    # Another setting runs the stage; its upload then refuses to mix its results with the folder's, as always.
    with pytest.raises(storage.OutputTakenError, match=r"seed: 0 -> 7"):
        run_stage(stage, load_recipe_text("run: {seed: 7}"), uri)
    assert run.count == 2


def never_run(*args, **kwargs):
    raise AssertionError("the stage ran although its folder holds the finished run")


def finished_training_folder(out: Path, fingerprint: dict, stats_name: str, stats: dict) -> None:
    """What a finished training run leaves: model/, the statistics, the fingerprint, the manifest written last."""
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / stats_name).write_text(json.dumps(stats))
    (out / FINGERPRINT_FILE).write_text(json.dumps(fingerprint))
    write_manifest(out, [out / "model", out / stats_name])


@pytest.fixture
def sft_data(tmp_path, bundled):
    return write_sft_dataset(tmp_path / "sft.jsonl", short_questions(bundled, 4))


def test_sft_folder_with_the_same_fingerprint_returns_its_metrics(tmp_path, sft_data, tiny_model):
    recipe, out = load_recipe_text("sft: {trainer: {learning_rate: 0.001}}"), tmp_path / "sft"
    stats = {"step": "sft", "steps": 16}
    finished_training_folder(out, sft_fingerprint(recipe.sft, sft_data, tiny_model, 0), "sft_metrics.json", stats)
    done = dataclasses.replace(SFT, run=never_run)
    assert run_stage(done, recipe, str(out), distill=str(sft_data), model=str(tiny_model)) == stats

    calls = []
    ran = dataclasses.replace(SFT, run=lambda *a, **k: calls.append(k) or {"step": "sft"})
    other = load_recipe_text("sft: {trainer: {learning_rate: 0.002}}")  # another setting: trained (here: called)
    run_stage(ran, other, str(out), distill=str(sft_data), model=str(tiny_model))
    (out / "sft_metrics.json").unlink()  # the declared statistics missing: not finished
    run_stage(ran, recipe, str(out), distill=str(sft_data), model=str(tiny_model))
    assert len(calls) == 2


def test_dpo_folder_with_the_same_fingerprint_returns_its_metrics_and_train_pass(tmp_path, tiny_model):
    rollout = tmp_path / "rollout"
    rollout.mkdir()
    (rollout / "pairs.jsonl").write_text('{"prompt": "p"}\n')
    (rollout / "pairs_heldout.jsonl").write_text('{"prompt": "h"}\n')
    recipe, out = load_recipe_text(""), tmp_path / "dpo"
    fingerprint = dpo_fingerprint(
        recipe.selfplay.dpo, rollout / "pairs.jsonl", rollout / "pairs_heldout.jsonl", tiny_model, 0
    )
    stats = {"step": "dpo", "status": "trained"}
    finished_training_folder(out, fingerprint, "dpo_metrics.json", stats)
    (out / "train_pass.json").write_text(json.dumps({"pass@1_after": 0.5}))
    (out / "rounds.json").write_text(json.dumps([{"rollout": None, "dpo": stats, "train_pass": None}]))
    done = dataclasses.replace(DPO, run=never_run)
    result = run_stage(done, recipe, str(out), rollout=str(rollout), model=str(tiny_model))
    assert result == stats | {"train_pass": {"pass@1_after": 0.5}}

    # Killed while measuring pass@1 after DPO, or before the rounds file (written last): not finished, run again.
    for last in ("train_pass.json", "rounds.json"):
        kept = (out / last).read_text()
        (out / last).unlink()
        with pytest.raises(AssertionError, match="the stage ran"):
            run_stage(done, recipe, str(out), rollout=str(rollout), model=str(tiny_model))
        (out / last).write_text(kept)

    (rollout / "pairs_heldout.jsonl").write_text('{"prompt": "other"}\n')  # other held-out pairs: trained again
    with pytest.raises(AssertionError, match="the stage ran"):
        run_stage(done, recipe, str(out), rollout=str(rollout), model=str(tiny_model))


def test_evaluation_folder_with_the_same_fingerprint_returns_its_report(tmp_path, bundled, tiny_model):
    data = tmp_path / "eval.jsonl"
    write_questions(bundled[:3], data)
    recipe, out = load_recipe_text(""), tmp_path / "eval"
    out.mkdir()
    fingerprint = evaluation_fingerprint(
        recipe.evaluate, recipe.generation, bundled[:3], tiny_model, device=recipe.run.device, dtype=recipe.model.dtype
    )
    (out / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, default=str))
    for name in EVALUATE.required_outputs:
        if not (out / name).exists():
            (out / name).write_text("{}")
    (out / EVALUATE.stats).write_text(json.dumps({"accuracy": 0.5}))
    done = dataclasses.replace(EVALUATE, run=never_run)
    assert run_stage(done, recipe, str(out), data=str(data), model=str(tiny_model)) == {"accuracy": 0.5}
    with pytest.raises(AssertionError, match="the stage ran"):  # the first two questions only: evaluated
        run_stage(done, load_recipe_text("evaluate: {limit: 2}"), str(out), data=str(data), model=str(tiny_model))
