"""Training questions' pass@1 before and after DPO, paired, from the rollout code."""

import json

import pytest

from medcritical.analysis.stats import mcnemar_exact
from medcritical.modeling.config import GenerationSection
from medcritical.selfplay.config import RolloutSection
from medcritical.selfplay.train_pass import before_after, bootstrap_mean_interval, train_pass, train_pass_line


def records(outcomes):
    """{question: [sample correct, ...]} -> rollout records."""
    return [
        {"question_id": q, "sample": s, "correct": c} for q, samples in outcomes.items() for s, c in enumerate(samples)
    ]


def test_before_after_known_values():
    before = records({"a": [False, False], "b": [True, False], "c": [False, True], "d": [True, True]})
    after = records({"a": [True, True], "b": [True, True], "c": [True, False], "d": [True, True], "e": [True, True]})
    stats = before_after(before, after)
    assert stats["questions"] == 4  # "e" was not asked before: not paired
    assert stats["pass@1_before"] == 0.5 and stats["pass@1_after"] == pytest.approx(7 / 8)
    assert stats["difference"] == pytest.approx(3 / 8)
    # first samples: a F->T, b T->T, c F->T, d T->T: 0 right only before, 2 only after
    assert stats["first_sample"] == {
        "only_before_correct": 0,
        "only_after_correct": 2,
        "mcnemar_p": mcnemar_exact(0, 2),
    }
    low, high = stats["difference_ci95"]
    assert low <= 3 / 8 <= high and low >= 0  # every per-question change is >= 0
    assert "50.0% → 87.5%" in train_pass_line(stats)


def test_bootstrap_mean_interval_of_a_constant_is_the_constant():
    assert bootstrap_mean_interval([0.25] * 30) == pytest.approx((0.25, 0.25))
    low, high = bootstrap_mean_interval([0, 1] * 50)
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)


def test_train_pass_reuses_the_rollout_on_the_same_questions(tmp_path, tiny_model, bundled):
    questions = bundled[:6]
    before = [{"question_id": q.id, "sample": s, "correct": s == 0} for q in questions[:4] for s in range(2)]
    rollout = RolloutSection(samples_per_question=2, max_new_tokens=8, chunk_size=4)
    stats = train_pass(
        rollout,
        GenerationSection(max_new_tokens=8),
        questions,
        before,
        tiny_model,
        tmp_path,
        limit=3,
        device="cpu",
        seed=0,
    )
    assert stats["questions"] == 3 and stats["pass@1_before"] == 0.5
    after = [json.loads(line) for line in (tmp_path / "train_pass.jsonl").read_text().splitlines()]
    assert len(after) == 6 and {r["question_id"] for r in after} <= {q.id for q in questions[:4]}
    assert stats["format_after"]["n"] == 6
    assert json.loads((tmp_path / "train_pass.json").read_text())["questions"] == 3


def test_dpo_step_glue_finds_the_rollout_the_questions_and_the_model(tmp_path, tiny_model, bundled):
    """The DPO stage's pass@1 after DPO: rollouts beside the pairs, questions from the run's data stage, the
    DPO folder's model; the report reads it per round."""
    import shutil

    from medcritical.data.cmexam import write_questions
    from medcritical.orchestration.recipe import load_recipe
    from medcritical.orchestration.report import REPORT
    from medcritical.orchestration.runner import run_stage
    from medcritical.selfplay.stage import measure_train_pass, write_rounds

    root = tmp_path / "run"
    write_questions(bundled[:5], root / "data" / "train.jsonl")
    rollout_dir, dpo_dir = root / "round1-rollout", root / "round1-dpo"
    rollout_dir.mkdir()
    (rollout_dir / "rollouts.jsonl").write_text(
        "".join(
            json.dumps({"question_id": q.id, "sample": s, "correct": False}) + "\n"
            for q in bundled[:5]
            for s in range(2)
        )
    )
    shutil.copytree(tiny_model, dpo_dir / "model")
    recipe = load_recipe(
        overrides=[
            f"run.output_dir={root}",
            "run.device=cpu",
            "evaluate.train_pass_questions=2",
            "selfplay.rollout.samples_per_question=2",
            "selfplay.rollout.max_new_tokens=4",
        ]
    )
    stats = measure_train_pass(
        recipe, rollout_dir / "rollouts.jsonl", root / "data" / "train.jsonl", dpo_dir / "model", dpo_dir
    )
    assert stats["questions"] == 2 and stats["pass@1_before"] == 0.0
    assert (dpo_dir / "train_pass.json").is_file()
    # The report reads it per round, from the rounds file the DPO stage writes last.
    write_rounds(dpo_dir, None, None)
    report = run_stage(REPORT, recipe, str(root / "report"), rounds=str(dpo_dir))
    assert "round 1 training questions' pass@1 before → after DPO: 0.0% →" in report["markdown"]
