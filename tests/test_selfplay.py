"""Stage 2 end to end through the CLI: rollout → pairs → dpo, and R rounds of self-play."""

import json

import pytest

from medcritical.cli import main
from medcritical.data.cmexam import write_questions

pytestmark = pytest.mark.slow  # end-to-end: left out of the quick lane (README, Tests)

# Small but real: every step runs, on the tiny format model, on CPU.
TINY_STAGE2 = [
    "run.device=cpu",
    # The tests roll out on the first bundled questions, given straight as a file; the default recipe splits
    # its evaluation questions off the same sample, and a file given straight is checked against them
    # (leaked ones dropped). No evaluation split here: every question given is rolled out.
    "data.eval_size=0",
    "selfplay.rollout.samples_per_question=3",
    "selfplay.rollout.temperature=1.0",
    "selfplay.rollout.max_new_tokens=40",
    "selfplay.correction.attempts=1",
    "selfplay.correction.temperature=1.0",
    "selfplay.pairs.heldout_fraction=0.25",
    "selfplay.dpo.lora={r: 8, alpha: 16, dropout: 0.0}",
    "selfplay.dpo.trainer={learning_rate: 5.0e-3, num_train_epochs: 1, per_device_train_batch_size: 4, gradient_accumulation_steps: 1, max_length: 384, logging_steps: 2}",
    "selfplay.dpo.evaluations=2",
    "generation.max_new_tokens=40",
]


# Words that refer back to an attempt the pair's prompt does not contain (written out here, not taken
# from the code under test), and the correction prompt's own wording.
BACK_REFERENCES = (
    "之前的回答",
    "之前的解答",
    "你之前",
    "我之前",
    "上一次",
    "原答案",
    "错误在于",
    "重新解答",
    "找出之前推理中的错误",
    "参考分析",
    "previous answer",
    "earlier attempt",
    "earlier answer",
    "my mistake",
    "find the error in your earlier reasoning",
    "reference analysis",
)


def assert_chosen_answers_stand_alone(rollout_dir):
    """Every chosen text of a real run answers the original prompt alone, in the trained format."""
    from medcritical.io.jsonl import read_jsonl

    pairs = read_jsonl(rollout_dir / "pairs.jsonl") + read_jsonl(rollout_dir / "pairs_heldout.jsonl")
    corrections = [p for p in pairs if p["chosen_source"] == "correction"]
    assert corrections, "the run made no pair from a correction: nothing to check"
    for pair in pairs:
        chosen = pair["chosen"][0]["content"]
        assert not [m for m in BACK_REFERENCES if m.lower() in chosen.lower()], chosen
        assert "</think>" in chosen and "答案" in chosen.rpartition("</think>")[2], chosen
    by_key = {(c["question_id"], c["sample"]): c for c in read_jsonl(rollout_dir / "corrections.jsonl")}
    for pair in corrections:  # the chosen text is the student's rewrite of the accepted correction
        record = by_key[(pair["question_id"], pair["rejected_sample"])]
        accepted = record["attempts"][-1]
        assert accepted["accepted"] and record["correction"] in [v["text"] for v in accepted["votes"]]
        assert pair["chosen"][0]["content"] == record["chosen"] == accepted["rewrite"]["text"]


def cli(*args, overrides=TINY_STAGE2):
    argv = list(args)
    for assignment in overrides:
        argv += ["--set", assignment]
    return main(argv)


@pytest.fixture
def question_files(selfplay_questions, bundled, tmp_path):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_questions(selfplay_questions[:24], train)
    write_questions(bundled[300:310], evaluation)
    return train, evaluation


def test_rollout_pairs_dpo_commands(question_files, format_model, tmp_path, capsys):
    train, _ = question_files
    assert (
        cli("rollout", "--questions", str(train), "--model", str(format_model), "--output", str(tmp_path / "rollout"))
        == 0
    )
    assert "pass@1" in capsys.readouterr().out
    stats = json.loads((tmp_path / "rollout" / "rollout_stats.json").read_text())
    assert stats["rollout"]["samples"] == 24 * 3 and stats["pairs"]["train_pairs"] > 0
    assert_chosen_answers_stand_alone(tmp_path / "rollout")
    assert stats["correction"]["expected_by_guessing"] > 0 and stats["cost"]["per_pair"]["student_tokens"] > 0
    assert stats["pairs"]["diagnostics"]["same_letters_share"] == 0.0

    # Rebuild the pairs with corrections only, without any model.
    assert (
        cli(
            "pairs",
            "--questions",
            str(train),
            "--rollout",
            str(tmp_path / "rollout"),
            "--output",
            str(tmp_path / "pairs"),
            overrides=["selfplay.pairs.use_correct_samples=false"],
        )
        == 0
    )
    rebuilt = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert rebuilt and {p["chosen_source"] for p in rebuilt} == {"correction"}

    assert (
        cli(
            "dpo",
            "--pairs",
            str(tmp_path / "rollout" / "pairs.jsonl"),
            "--model",
            str(format_model),
            "--output",
            str(tmp_path / "dpo"),
        )
        == 0
    )
    metrics = json.loads((tmp_path / "dpo" / "dpo_metrics.json").read_text())
    assert (
        metrics["status"] == "trained" and metrics["heldout_pairs"] == stats["pairs"]["heldout_pairs"]
    )  # found beside --pairs
    # One epoch: the held-out evaluation after the first epoch is the final one.
    assert metrics["heldout_after_first_epoch"]["reward_accuracy"] == metrics["heldout"]["reward_accuracy"]

    # The run report's stage-2 section shows the same statistics (corrections, luck, pairs, cost).
    from medcritical.orchestration.recipe import Recipe
    from medcritical.orchestration.report import write_run_report

    report = write_run_report(
        Recipe(),
        {"base": None, "sft": None, "dpo": None},
        {"rounds": [{"rollout": stats, "dpo": metrics}]},
        tmp_path / "report",
    )
    assert "## Stage 2: corrections, pairs and cost" in report["markdown"]
    correction = stats["correction"]
    guessed = (
        "| of which chance explains (analytic lower bound – placebo, its rewrites not run) | "
        f"{correction['expected_by_guessing']:.2f} – {correction['placebo']['expected']:.2f} |"
    )
    assert guessed in report["markdown"] and "| student tokens per pair |" in report["markdown"]
    assert (tmp_path / "dpo" / "model" / "model.safetensors").is_file()


def assert_rounds_files_accumulate(root, rounds: int, recipe_rounds: int | None = None) -> list[dict]:
    """Each round's DPO folder holds every round's statistics so far (rounds.json), exactly the files the report
    read from the round folders before it had them as a declared input; the report shows the same from the last
    round's file alone. Returns the last round's list."""
    from medcritical.orchestration.recipe import load_recipe
    from medcritical.orchestration.report import REPORT, round_statistics
    from medcritical.orchestration.runner import run_stage
    from medcritical.orchestration.staging import read_stats
    from medcritical.selfplay.stage import DPO, ROLLOUT, ROUNDS_FILE
    from medcritical.selfplay.train_pass import TRAIN_PASS_STATS

    recipe = load_recipe(None, [f"run.output_dir={root}", f"selfplay.rounds={recipe_rounds or rounds}"])
    # What the report read per round before (report.round_statistics under also_reading): each round's folders.
    expected = [
        {
            "rollout": read_stats(str(root), ROLLOUT, number),
            "dpo": read_stats(str(root), DPO, number),
            "train_pass": read_stats(str(root), DPO, number, TRAIN_PASS_STATS),
        }
        for number in range(1, recipe.selfplay.rounds + 1)
    ]
    for number in range(1, rounds + 1):
        written = json.loads((root / f"round{number}-dpo" / ROUNDS_FILE).read_text())
        assert written == expected[:number], f"round {number}'s {ROUNDS_FILE}"
    last = root / f"round{rounds}-dpo"
    assert round_statistics(recipe, last / ROUNDS_FILE) == expected
    report = run_stage(REPORT, recipe, str(root / "report"), rounds=str(last))
    for number in range(1, recipe.selfplay.rounds + 1):
        assert f"- round {number} rollout: " in report["markdown"] and f"- round {number} dpo: " in report["markdown"]
    assert json.loads((root / "report" / "report.json").read_text())["steps"]["rounds"] == expected
    return written


def test_two_rounds_each_from_the_previous_model(question_files, format_model, tmp_path, capsys):
    train, evaluation = question_files
    args = (
        "selfplay",
        "--questions",
        str(train),
        "--eval-questions",
        str(evaluation),
        "--model",
        str(format_model),
        "--output",
        str(tmp_path / "sp"),
    )
    # DPO at a learning rate that barely moves the scripted model, so round 2 meets the same situation as round 1
    # (at 5e-3 round 1 teaches it to answer B everywhere, and its script then has no correction left to make).
    two_epochs = TINY_STAGE2 + [
        "selfplay.rounds=2",
        "selfplay.dpo.trainer.num_train_epochs=2",
        "selfplay.dpo.trainer.learning_rate=1.0e-7",
    ]
    assert cli(*args, overrides=two_epochs) == 0
    summary = json.loads((tmp_path / "sp" / "selfplay_stats.json").read_text())
    first, second = summary["rounds"]
    assert first["model_in"] == str(format_model)
    assert second["model_in"] == str(tmp_path / "sp" / "round1-dpo")  # the pipeline's folder names
    assert summary["final_model"] == str(tmp_path / "sp" / "round2-dpo") and summary["stopped"] is None
    for row in (first, second):
        assert row["dpo"] == "trained" and row["train_pairs"] > 0 and 0 <= row["heldout_reward_accuracy"] <= 1
        assert 0 <= row["eval_accuracy_in"] <= 1  # CMExam accuracy of the model the round started from
    report = json.loads((tmp_path / "sp" / "round1-eval" / "report.json").read_text())
    assert report["n"] == 10 and report["accuracy"] == first["eval_accuracy_in"]
    assert summary["final_eval"]["n"] == 10
    assert json.loads((tmp_path / "sp" / "eval-dpo-round2" / "report.json").read_text())["n"] == 10
    assert (tmp_path / "sp" / "selfplay.png").is_file()
    assert_rounds_files_accumulate(tmp_path / "sp", rounds=2)

    # Two epochs: a held-out evaluation was forced where the first one ended, before the last step.
    dpo = json.loads((tmp_path / "sp" / "round1-dpo" / "dpo_metrics.json").read_text())
    first = dpo["heldout_after_first_epoch"]
    assert first["epoch"] == pytest.approx(1.0) and 0 < first["step"] < dpo["steps"]
    assert first["step"] in [h["step"] for h in dpo["heldout"]["history"]]

    # A rerun resumes: every step finds its work done and the summary is the same.
    assert cli(*args, overrides=two_epochs) == 0
    assert json.loads((tmp_path / "sp" / "selfplay_stats.json").read_text()) == summary

    # The arms table reads the same run folder's statistics (compared with itself: nothing differs).
    capsys.readouterr()
    assert (
        cli("arms", f"a={tmp_path / 'sp'}", f"b={tmp_path / 'sp'}", "--output", str(tmp_path / "arms.md"), overrides=[])
        == 0
    )
    table = (tmp_path / "arms.md").read_text()
    rollout = json.loads((tmp_path / "sp" / "round1-rollout" / "rollout_stats.json").read_text())
    assert table in capsys.readouterr().out
    assert f"| corrections accepted / wrong trajectories | {rollout['correction']['corrected']} / " in table
    assert f"{100 * report['accuracy']:.1f}% (n=10)" in table and "exact McNemar p=1)" in table
    assert "0 right only with a, 0 right only with b" in table


def test_a_round_without_pairs_ends_the_loop(question_files, format_model, tmp_path, capsys):
    train, _ = question_files
    no_pairs = TINY_STAGE2 + [
        "selfplay.rounds=3",
        "selfplay.correction.attempts=0",
        "selfplay.pairs.use_correct_samples=false",
    ]
    assert (
        cli(
            "selfplay",
            "--questions",
            str(train),
            "--model",
            str(format_model),
            "--output",
            str(tmp_path / "sp"),
            overrides=no_pairs,
        )
        == 0
    )
    summary = json.loads((tmp_path / "sp" / "selfplay_stats.json").read_text())
    assert len(summary["rounds"]) == 1 and summary["rounds"][0]["dpo"] == "skipped"
    assert "round 1: no training pairs" in summary["stopped"] and summary["final_model"] == str(format_model)
    # The skipped round's DPO still writes its rounds file: the report says why it did not train, and the rounds
    # the early stop left out are "not run", as when it read every round's folders.
    (entry,) = assert_rounds_files_accumulate(tmp_path / "sp", rounds=1, recipe_rounds=3)
    assert entry["dpo"]["status"] == "skipped" and entry["train_pass"] is None
