"""Every input declared (issue 26 item 2): the runner refuses a stage's read of the run's folders outside its
declared inputs and output folder; the report and DPO read what they declare, and say what they could not do."""

import json
import shutil
import threading
from pathlib import Path

import pytest

from medcritical.core.stage import Input, Stage
from medcritical.io.read_guard import UndeclaredReadError, reading_only
from medcritical.orchestration.recipe import load_recipe
from medcritical.orchestration.runner import run_stage


def _reader(reads):
    """A stage whose run reads `reads(inputs)` (paths) and records their text."""

    def run(recipe, output_dir: Path, *, rollout: Path, rollouts: Path | None = None) -> dict:
        texts = [Path(p).read_text(encoding="utf-8") for p in reads(rollout=rollout, rollouts=rollouts)]
        (output_dir / "stats.json").write_text(json.dumps({"read": texts}), encoding="utf-8")
        return {"read": texts}

    return run


def _stage(reads, **extra_inputs) -> Stage:
    return Stage(
        name="reader",
        folder="reader",
        section="run",
        run=_reader(reads),
        inputs={"rollout": Input("pairs.jsonl"), **extra_inputs},
        outputs=("stats.json",),
        stats="stats.json",
        fingerprint=None,
    )


@pytest.fixture
def run_root(tmp_path):
    root = tmp_path / "run"
    rollout = root / "round1-rollout"
    rollout.mkdir(parents=True)
    for name in ("pairs.jsonl", "rollouts.jsonl"):
        (rollout / name).write_text(name, encoding="utf-8")
    (root / "sft").mkdir()
    (root / "sft" / "sft_metrics.json").write_text("{}", encoding="utf-8")
    return root


def test_an_undeclared_sibling_file_is_refused(run_root):
    """`rollout.parent / ROLLOUTS`, the read the issue names: refused, naming the stage, the file and the fix."""
    recipe = load_recipe(None, [f"run.output_dir={run_root}"])
    stage = _stage(lambda rollout, rollouts: [rollout, rollout.parent / "rollouts.jsonl"])
    with pytest.raises(UndeclaredReadError) as refused:
        run_stage(stage, recipe, str(run_root / "reader"), rollout=str(run_root / "round1-rollout" / "pairs.jsonl"))
    message = str(refused.value)
    assert "stage reader" in message and "rollouts.jsonl" in message
    assert "declare it as an input" in message
    # Another stage's folder under the run root, through no input at all: refused too.
    stage = _stage(lambda rollout, rollouts: [run_root / "sft" / "sft_metrics.json"])
    with pytest.raises(UndeclaredReadError, match="sft_metrics.json"):
        run_stage(stage, recipe, str(run_root / "reader"), rollout=str(run_root / "round1-rollout"))


def test_the_same_file_declared_beside_the_input_is_read(run_root, tmp_path):
    recipe = load_recipe(None, [f"run.output_dir={run_root}"])
    elsewhere = tmp_path / "notes.txt"  # outside the run's folders: not the guard's business
    elsewhere.write_text("notes", encoding="utf-8")
    stage = _stage(
        lambda rollout, rollouts: [rollout, rollouts, elsewhere],
        rollouts=Input("rollouts.jsonl", beside="rollout", optional=True),
    )
    result = run_stage(
        stage, recipe, str(run_root / "reader"), rollout=str(run_root / "round1-rollout" / "pairs.jsonl")
    )
    assert result["read"] == ["pairs.jsonl", "rollouts.jsonl", "notes"]
    # Outside a stage nothing is guarded.
    assert (run_root / "sft" / "sft_metrics.json").read_text(encoding="utf-8") == "{}"


def test_the_guard_covers_the_stage_thread_not_threads_it_starts(run_root):
    """A context variable: the stage's own thread is guarded; a thread it starts begins with an empty context
    (documented in io/read_guard.py), as do stages running side by side in other threads."""
    sibling = run_root / "round1-rollout" / "rollouts.jsonl"
    seen = []
    with reading_only(
        _stage(lambda **_: []), run_root / "reader", {"rollout": run_root / "round1-rollout" / "pairs.jsonl"}
    ):
        with pytest.raises(UndeclaredReadError):
            sibling.read_text(encoding="utf-8")
        worker = threading.Thread(target=lambda: seen.append(sibling.read_text(encoding="utf-8")))
        worker.start()
        worker.join()
        (run_root / "reader").mkdir(exist_ok=True)
        (run_root / "reader" / "x.txt").write_text("written", encoding="utf-8")  # its output: written and read back
        assert (run_root / "reader" / "x.txt").read_text(encoding="utf-8") == "written"
    assert seen == ["rollouts.jsonl"]


def test_a_model_input_brings_its_training_stage_folder(run_root, tiny_model):
    """A model input is the folder the runner passes; a training stage's model/ comes with the manifest beside
    it (model fingerprints read it), but not with the other stages' folders."""
    sft = run_root / "sft"
    shutil.copytree(tiny_model, sft / "model")
    (sft / "manifest.json").write_text("{}", encoding="utf-8")
    model_stage = Stage(
        name="trainer",
        folder="trainer",
        section="run",
        run=lambda recipe, output_dir, *, model: {},
        inputs={"model": Input()},
        outputs=(),
        stats="stats.json",
        fingerprint=None,
    )
    with reading_only(model_stage, run_root / "round1-dpo", {"model": sft / "model"}):
        assert (sft / "manifest.json").read_text(encoding="utf-8") == "{}"
        (sft / "model" / "config.json").read_text(encoding="utf-8")
        with pytest.raises(UndeclaredReadError):
            (run_root / "round1-rollout" / "pairs.jsonl").read_text(encoding="utf-8")


# -- the report ------------------------------------------------------------------------------------------


def test_the_report_names_a_reused_distillation(tmp_path):
    """distill_uri: the report reads the earlier run's statistics and says they were reused, not 'not run'."""
    from medcritical.orchestration.report import REPORT

    root, earlier = tmp_path / "run-2", tmp_path / "run-1" / "distill"
    earlier.mkdir(parents=True)
    stats = {"questions": 9, "accepted": 8, "acceptance_rate": 0.889, "trace_attempts": 9}
    (earlier / "distill_stats.json").write_text(json.dumps(stats))
    (root / "data").mkdir(parents=True)
    (root / "data" / "data_stats.json").write_text(json.dumps({"train": 7, "eval": 3, "bad_rows": []}))
    recipe = load_recipe(None, [f"run.output_dir={root}"])
    report = run_stage(REPORT, recipe, str(root / "report"), distill=str(earlier))
    line = next(line for line in report["markdown"].splitlines() if line.startswith("- distill:"))
    assert "questions=9, accepted=8" in line and f"reused from {earlier}" in line, line
    assert "- data: train=7, eval=3" in report["markdown"]
    summary = json.loads((root / "report" / "report.json").read_text())
    assert summary["reused"] == {"distill": str(earlier)}
    # This run's own distillation is not 'reused'.
    (root / "distill").mkdir()
    (root / "distill" / "distill_stats.json").write_text(json.dumps(stats))
    report = run_stage(REPORT, recipe, str(root / "report"))
    assert "- distill: questions=9, accepted=8, acceptance_rate=0.889, trace_attempts=9\n" in report["markdown"]


def test_the_report_declares_the_statistics_it_reads():
    from medcritical.orchestration.report import REPORT

    declared = {name: (spec.file, spec.default_stage) for name, spec in REPORT.inputs.items()}
    assert declared["data"] == ("data_stats.json", "prepare_data")
    assert declared["sft"] == ("sft_metrics.json", "sft")
    assert declared["distill"] == ("distill_stats.json", "distill")
    # Every round's statistics: the last round's rounds file (no default: the last round depends on the run).
    assert declared["rounds"] == ("rounds.json", None)


def _round_folders(root: Path, rounds: int) -> list[dict]:
    """A run root with `rounds` rounds' statistics in their folders, and each DPO folder's rounds file."""
    written = []
    for number in range(1, rounds + 1):
        entry = {
            "rollout": {"rollout": {"questions": 10 * number, "pass@1": 0.5}, "pairs": {"train_pairs": number}},
            "dpo": {"status": "trained", "train_pairs": number, "steps": 3 * number},
            "train_pass": {"status": "not measured", "reason": f"round {number}'s reason"},
        }
        rollout, dpo = root / f"round{number}-rollout", root / f"round{number}-dpo"
        rollout.mkdir(parents=True)
        dpo.mkdir()
        (rollout / "rollout_stats.json").write_text(json.dumps(entry["rollout"]))
        (dpo / "dpo_metrics.json").write_text(json.dumps(entry["dpo"]))
        (dpo / "train_pass.json").write_text(json.dumps(entry["train_pass"]))
        written.append(entry)
        (dpo / "rounds.json").write_text(json.dumps(written))
    return written


def test_the_report_reads_the_rounds_only_through_its_declared_input(tmp_path):
    """The rounds are one declared input now (the last round's rounds file), not reads of every round's folders
    under the run root: with the guard on (runner._execute), the report shows them from that file, and without it
    says "not run" rather than reading the round folders beside it."""
    from medcritical.orchestration.report import REPORT, round_statistics
    from medcritical.orchestration.staging import read_stats
    from medcritical.selfplay.stage import DPO

    root = tmp_path / "run"
    written = _round_folders(root, 2)
    recipe = load_recipe(None, [f"run.output_dir={root}", "selfplay.rounds=2"])
    report = run_stage(REPORT, recipe, str(root / "report"), rounds=str(root / "round2-dpo"))
    markdown = report["markdown"]
    assert "- round 1 rollout: questions=10, pass@1=0.5, train_pairs=1" in markdown
    assert "- round 2 dpo: train_pairs=2, steps=6" in markdown
    assert "- round 2 training questions' pass@1 before → after DPO: not measured (round 2's reason)" in markdown
    assert json.loads((root / "report" / "report.json").read_text())["steps"]["rounds"] == written
    # Not given: every round "not run", its folders not read (a read of them would be refused, and show them).
    report = run_stage(REPORT, recipe, str(root / "report"))
    assert "- round 1 rollout: not run" in report["markdown"] and "- round 2 dpo: not run" in report["markdown"]
    # A read of a round's statistics the report does not declare is refused by the guard: the reads it made
    # before, each round's folder under the run root.
    with reading_only(REPORT, root / "report", {}), pytest.raises(UndeclaredReadError, match="dpo_metrics.json"):
        read_stats(str(root), DPO, 1)
    with reading_only(REPORT, root / "report", {"rounds": root / "round2-dpo" / "rounds.json"}):
        assert round_statistics(recipe, root / "round2-dpo" / "rounds.json") == written
        with pytest.raises(UndeclaredReadError, match="train_pass.json"):
            read_stats(str(root), DPO, 2, "train_pass.json")


def test_a_short_rounds_file_leaves_the_recipe_s_later_rounds_not_run(tmp_path):
    """An early stop (a round without pairs ends the loop): the last round that ran holds fewer rounds than the
    recipe's; the others are "not run", as when the report read each round's folder."""
    from medcritical.orchestration.report import round_statistics

    root = tmp_path / "run"
    written = _round_folders(root, 1)
    recipe = load_recipe(None, [f"run.output_dir={root}", "selfplay.rounds=3"])
    empty = {"rollout": None, "dpo": None, "train_pass": None}
    assert round_statistics(recipe, root / "round1-dpo" / "rounds.json") == written + [empty, empty]
    assert round_statistics(recipe, None) == [empty] * 3


# -- DPO given the pairs file itself ---------------------------------------------------------------------


@pytest.fixture
def dpo_round(tmp_path, tiny_model, bundled, monkeypatch):
    """A run root with the data stage's questions and a rollout folder; DPO's trainer replaced by a copy of the
    tiny model (the training is not what is tested: what DPO reads, and what the report says)."""
    from medcritical.data.cmexam import write_questions
    from medcritical.training import dpo as training_dpo

    root = tmp_path / "run"
    write_questions(bundled[:4], root / "data" / "train.jsonl")
    rollout = root / "round1-rollout"
    rollout.mkdir()
    (rollout / "pairs.jsonl").write_text("{}\n")
    (rollout / "rollouts.jsonl").write_text(
        "".join(
            json.dumps({"question_id": q.id, "sample": s, "correct": False}) + "\n"
            for q in bundled[:4]
            for s in range(2)
        )
    )

    def trained(config, pairs_path, heldout_path, model_path, output_dir, **_):
        shutil.copytree(model_path, Path(output_dir) / "model", dirs_exist_ok=True)
        metrics = {"status": "trained", "model": str(Path(output_dir) / "model"), "train_pairs": 1}
        (Path(output_dir) / "dpo_metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(training_dpo, "train_dpo", trained)
    recipe = load_recipe(
        None,
        [
            f"run.output_dir={root}",
            "run.device=cpu",
            "evaluate.train_pass_questions=2",
            "selfplay.rollout.samples_per_question=2",
            "selfplay.rollout.max_new_tokens=4",
        ],
    )
    return recipe, root, tiny_model


def test_dpo_given_the_pairs_file_measures_pass_at_1_from_the_declared_rollouts(dpo_round):
    """The rollout input names the pairs file itself (the contract allows it): the rollouts beside it come as a
    declared input, pass@1 after DPO is measured, the guard does not trip, and the report shows it."""
    from medcritical.orchestration.report import REPORT
    from medcritical.selfplay.stage import DPO

    recipe, root, model = dpo_round
    pairs = root / "round1-rollout" / "pairs.jsonl"
    result = run_stage(DPO, recipe, str(root / "round1-dpo"), rollout=str(pairs), model=str(model))
    assert result["train_pass"]["questions"] == 2 and result["train_pass"]["pass@1_before"] == 0.0
    report = run_stage(REPORT, recipe, str(root / "report"), rounds=str(root / "round1-dpo"))
    assert "- round 1 training questions' pass@1 before → after DPO: 0.0% →" in report["markdown"]


def test_pass_at_1_not_measured_is_said_in_the_report(dpo_round):
    """Without rollouts beside the pairs the measurement cannot be made: the report says why, not nothing."""
    from medcritical.orchestration.report import REPORT
    from medcritical.selfplay.stage import DPO

    recipe, root, model = dpo_round
    (root / "round1-rollout" / "rollouts.jsonl").unlink()
    pairs = root / "round1-rollout" / "pairs.jsonl"
    result = run_stage(DPO, recipe, str(root / "round1-dpo"), rollout=str(pairs), model=str(model))
    assert result["train_pass"]["status"] == "not measured"
    report = run_stage(REPORT, recipe, str(root / "report"), rounds=str(root / "round1-dpo"))
    assert (
        "- round 1 training questions' pass@1 before → after DPO: not measured (no rollouts.jsonl beside the pairs"
        in report["markdown"]
    )
    # A round whose DPO trained without the statistics file (an older step): said too.
    rounds_file = root / "round1-dpo" / "rounds.json"
    (entry,) = json.loads(rounds_file.read_text())
    rounds_file.write_text(json.dumps([entry | {"train_pass": None}]))
    report = run_stage(REPORT, recipe, str(root / "report"), rounds=str(rounds_file))
    assert "pass@1 before → after DPO: not measured (no train_pass.json in the round's DPO folder" in report["markdown"]


def test_the_report_fetches_the_sft_statistics_from_s3_without_the_model(s3_env, tmp_path, monkeypatch):
    """The SFT statistics are a declared input now (the runner finds them under the run root, s3:// too): of the
    SFT folder only that file comes down, never the model beside it."""
    from medcritical import storage
    from medcritical.orchestration.report import REPORT

    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    sft = tmp_path / "sft"
    (sft / "model").mkdir(parents=True)
    (sft / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    (sft / "sft_metrics.json").write_text(json.dumps({"examples": 12, "steps": 3}))
    root = f"s3://{s3_env}/run"
    storage.upload(sft, f"{root}/sft")
    recipe = load_recipe(None, [f"run.output_dir={root}"])
    report = run_stage(REPORT, recipe, f"{root}/report")
    assert "- sft: examples=12, steps=3" in report["markdown"]
    assert not list((tmp_path / "work").rglob("model.safetensors")), "the SFT model was downloaded for its statistics"
