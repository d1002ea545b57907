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
from medcritical.distill.config import DistillSection, LocalTeacher
from medcritical.distill.run import setup_fingerprint
from medcritical.distill.stage import DISTILL
from medcritical.distill.teachers import build_teacher, teacher_identity
from medcritical.distill.traces import DistillPrompts
from medcritical.evaluation.evaluate import evaluation_fingerprint
from medcritical.evaluation.stage import EVALUATE
from medcritical.io.fingerprint import FINGERPRINT_FILE, ResumeMismatch
from medcritical.io.manifest import write_manifest
from medcritical.orchestration.recipe import load_recipe_text
from medcritical.orchestration.runner import STAGES, run_stage
from medcritical.selfplay.stage import DPO, ROLLOUT
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
    # Every stage with a fingerprint is decided by the runner.
    assert {s.name for s in STAGES.values() if s.expected_fingerprint} == {
        s.name for s in STAGES.values() if s.fingerprint
    }
    assert {s.name for s in STAGES.values() if s.expected_fingerprint} >= {
        "distill",
        "sft",
        "rollout",
        "dpo",
        "evaluate",
    }


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


class Trap:
    """Put in place of what a stage must call to do its work (load a model, build a teacher): a run that gets
    that far fails, naming it; one decided finished by the runner never gets there."""

    def __init__(self, monkeypatch, target: str):
        self.monkeypatch, self.target = monkeypatch, target

    def __enter__(self):
        def sprung(*args, **kwargs):
            raise AssertionError(f"the stage ran: {self.target} was called")

        self.monkeypatch.setattr(self.target, sprung)
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()


def recorded_fingerprint(out: Path) -> dict:
    return json.loads((out / FINGERPRINT_FILE).read_text(encoding="utf-8"))


ROLLOUT_RECIPE = """
run: {device: cpu}
selfplay:
  rollout: {samples_per_question: 2, temperature: 1.0, top_p: 1.0, max_new_tokens: 12, chunk_size: 8}
  correction: {attempts: 1, votes: 1}
"""


def test_rollout_finished_folder_is_not_run_again_and_a_pairs_setting_rebuilds_its_pairs(
    tmp_path, bundled, tiny_model, monkeypatch
):
    data, out = tmp_path / "train.jsonl", tmp_path / "rollout"
    write_questions(bundled[:3], data)
    recipe = load_recipe_text(ROLLOUT_RECIPE)
    inputs = {"data": str(data), "model": str(tiny_model)}
    first = run_stage(ROLLOUT, recipe, str(out), **inputs)
    assert recorded_fingerprint(out)["pairs"]["max_pairs_per_question"] == 4  # the pairs settings are recorded
    rollouts = (out / "rollouts.jsonl").read_bytes()
    loader = "medcritical.selfplay.run.generator_for"  # every run of the stage opens the student
    with Trap(monkeypatch, loader):
        assert run_stage(ROLLOUT, recipe, str(out), **inputs) == json.loads(json.dumps(first))
    with Trap(monkeypatch, loader), pytest.raises(AssertionError, match="the stage ran"):
        run_stage(ROLLOUT, recipe, str(out), **inputs, restart=True)

    # Another selfplay.pairs setting: run again; the logs are resumed as they are and only the pairs rebuilt.
    fewer = load_recipe_text(ROLLOUT_RECIPE + "  pairs: {max_pairs_per_question: 1}\n")
    again = run_stage(ROLLOUT, fewer, str(out), **inputs)
    assert (out / "rollouts.jsonl").read_bytes() == rollouts
    assert recorded_fingerprint(out)["pairs"]["max_pairs_per_question"] == 1
    assert again["rollout"] == first["rollout"]
    with Trap(monkeypatch, loader):
        assert run_stage(ROLLOUT, fewer, str(out), **inputs)["pairs"] == again["pairs"]
    with Trap(monkeypatch, loader), pytest.raises(AssertionError, match="the stage ran"):
        run_stage(ROLLOUT, recipe, str(out), **inputs)  # back to the first pairs settings: not what is recorded
    # A price changes the statistics only: run again too.
    with Trap(monkeypatch, loader), pytest.raises(AssertionError, match="the stage ran"):
        run_stage(ROLLOUT, load_recipe_text(ROLLOUT_RECIPE + "  cost: {device_hour_price: 2.0}\n"), str(out), **inputs)


def test_rollout_interrupted_before_its_pairs_is_not_finished(tmp_path, bundled, tiny_model, monkeypatch):
    """The pairs settings are recorded last: a run killed while rebuilding the pairs leaves a folder the
    runner does not take for finished, although every output of the run before it is there."""
    data, out = tmp_path / "train.jsonl", tmp_path / "rollout"
    write_questions(bundled[:2], data)
    recipe, inputs = load_recipe_text(ROLLOUT_RECIPE), {"data": str(data), "model": str(tiny_model)}
    run_stage(ROLLOUT, recipe, str(out), **inputs)
    fewer = load_recipe_text(ROLLOUT_RECIPE + "  pairs: {heldout_fraction: 0.5}\n")
    with Trap(monkeypatch, "medcritical.selfplay.run.write_pairs"), pytest.raises(AssertionError):
        run_stage(ROLLOUT, fewer, str(out), **inputs)
    assert "pairs" not in recorded_fingerprint(out)
    with Trap(monkeypatch, "medcritical.selfplay.run.generator_for"), pytest.raises(AssertionError):
        run_stage(ROLLOUT, recipe, str(out), **inputs)  # nor for the settings it was made with before
    assert run_stage(ROLLOUT, fewer, str(out), **inputs)["pairs"]["heldout_questions"] >= 0


def test_distill_finished_folder_is_not_run_again_and_a_changed_setting_resumes_it(tmp_path, bundled, monkeypatch):
    data, out = tmp_path / "train.jsonl", tmp_path / "distill"
    write_questions(bundled[:3], data)
    recipe = load_recipe_text("")  # the explanations teacher
    first = run_stage(DISTILL, recipe, str(out), data=str(data))
    assert first["questions"] == 3 and recorded_fingerprint(out)["questions"]
    builder = "medcritical.distill.run.build_teacher"  # every run of the stage builds its teacher
    with Trap(monkeypatch, builder):
        assert run_stage(DISTILL, recipe, str(out), data=str(data)) == json.loads(json.dumps(first))
    with Trap(monkeypatch, builder), pytest.raises(AssertionError, match="the stage ran"):
        run_stage(DISTILL, recipe, str(out), data=str(data), restart=True)

    # Another setting deciding the outputs: run again, resuming the teacher's replies question by question.
    fewer = load_recipe_text("distill: {limit: 2}")
    again = run_stage(DISTILL, fewer, str(out), data=str(data))
    assert (again["questions"], again["resumed_questions"]) == (2, 2)
    with Trap(monkeypatch, builder):
        assert run_stage(DISTILL, fewer, str(out), data=str(data))["questions"] == 2
    with Trap(monkeypatch, builder), pytest.raises(AssertionError, match="the stage ran"):
        run_stage(DISTILL, load_recipe_text("distill: {limit: 2, verify: false}"), str(out), data=str(data))


def test_distill_completion_is_decided_without_loading_a_local_teacher(tmp_path, bundled, tiny_model, monkeypatch):
    data, out = tmp_path / "train.jsonl", tmp_path / "distill"
    write_questions(bundled[:2], data)
    recipe = load_recipe_text(
        f"run: {{device: cpu}}\ndistill: {{backend: transformers, teacher_model: '{tiny_model}', attempts: 1, "
        "max_new_tokens: 8, template_max_new_tokens: 8}"
    )
    first = run_stage(DISTILL, recipe, str(out), data=str(data))
    assert recorded_fingerprint(out)["weights"] and recorded_fingerprint(out)["dtype"] == "float32"
    loader = "medcritical.distill.teachers.load_generator"  # a local teacher's model
    with Trap(monkeypatch, loader):
        assert run_stage(DISTILL, recipe, str(out), data=str(data)) == json.loads(json.dumps(first))
    longer = recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"max_new_tokens": 9})})
    with Trap(monkeypatch, loader), pytest.raises(AssertionError, match="the stage ran"):
        run_stage(DISTILL, longer, str(out), data=str(data))


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_a_teacher_is_fingerprinted_from_the_recipe_as_when_built(tiny_model, dtype):
    """The distillation's fingerprint is computed without building the teacher; it must be the one the built
    teacher gives, or a finished folder would never be recognised (or another teacher's taken for it)."""
    prompts = DistillPrompts.load("zh")
    for config in (
        DistillSection(),
        DistillSection(explanation_max_chars=40),
        DistillSection(backend="transformers", teacher_model=str(tiny_model), local=LocalTeacher(dtype=dtype)),
    ):
        teacher = build_teacher(config, prompts, device="cpu")
        try:
            built = setup_fingerprint(config, prompts, teacher)
        finally:
            teacher.close()
        assert setup_fingerprint(config, prompts, teacher_identity(config, device="cpu")) == built


EVAL_RECIPE = "run: {device: cpu}\ngeneration: {max_new_tokens: 8}\n"


def test_evaluation_finished_folder_is_not_run_again_under_its_label(tmp_path, bundled, tiny_model, monkeypatch):
    data, out = tmp_path / "eval.jsonl", tmp_path / "eval"
    write_questions(bundled[:3], data)
    recipe, inputs = load_recipe_text(EVAL_RECIPE), {"data": str(data), "model": str(tiny_model)}
    first = run_stage(EVALUATE, recipe, str(out), **inputs, label="round 1")
    assert first["label"] == "round 1" and recorded_fingerprint(out)["label"] == "round 1"
    outputs = (out / "outputs.jsonl").read_bytes()
    loader = "medcritical.evaluation.evaluate.generator_for"  # every run of the stage opens the model
    with Trap(monkeypatch, loader):
        assert run_stage(EVALUATE, recipe, str(out), **inputs, label="round 1") == json.loads(json.dumps(first))
    with Trap(monkeypatch, loader), pytest.raises(AssertionError, match="the stage ran"):
        run_stage(EVALUATE, recipe, str(out), **inputs, label="round 1", restart=True)

    # Another label: run again, the outputs resumed as they are, the report written under the new label.
    relabelled = run_stage(EVALUATE, recipe, str(out), **inputs, label="final")
    assert relabelled["label"] == "final" and relabelled["accuracy"] == first["accuracy"]
    assert (out / "outputs.jsonl").read_bytes() == outputs
    with Trap(monkeypatch, loader):
        assert run_stage(EVALUATE, recipe, str(out), **inputs, label="final")["label"] == "final"
    with Trap(monkeypatch, loader), pytest.raises(AssertionError, match="the stage ran"):
        run_stage(EVALUATE, recipe, str(out), **inputs)  # no label is another label

    # Another setting the outputs depend on: run, and refused (the outputs are another model's work) unless restart.
    shorter = load_recipe_text(EVAL_RECIPE.replace("8", "4"))
    with pytest.raises(ResumeMismatch, match="max_new_tokens: 8 -> 4"):
        run_stage(EVALUATE, shorter, str(out), **inputs, label="final")
    assert run_stage(EVALUATE, shorter, str(out), **inputs, label="final", restart=True)["max_new_tokens"] == 4


def test_evaluation_folder_with_a_report_but_no_label_recorded_is_run_again(tmp_path, bundled, tiny_model):
    """A folder written before the label was recorded, or by a run killed after its report: not finished."""
    data, out = tmp_path / "eval.jsonl", tmp_path / "eval"
    write_questions(bundled[:3], data)
    recipe = load_recipe_text("")
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
    with pytest.raises(AssertionError, match="the stage ran"):
        run_stage(done, recipe, str(out), data=str(data), model=str(tiny_model))
    (out / FINGERPRINT_FILE).write_text(json.dumps(fingerprint | {"label": None}, default=str))
    assert run_stage(done, recipe, str(out), data=str(data), model=str(tiny_model)) == {"accuracy": 0.5}
    with pytest.raises(AssertionError, match="the stage ran"):  # the first two questions only: evaluated
        run_stage(done, load_recipe_text("evaluate: {limit: 2}"), str(out), data=str(data), model=str(tiny_model))
