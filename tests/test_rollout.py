"""Rollout and self-correction on a real tiny model with the real grader."""

import json

import pytest

from medcritical.grader import grade_answer
from medcritical.io.jsonl import read_jsonl
from medcritical.modeling.generation import TransformersGenerator
from medcritical.selfplay.config import CorrectionSection, RolloutSection, SelfPlayConfig
from medcritical.selfplay.correction import correct_trajectories, correction_statistics
from medcritical.selfplay.rollout import rollout_questions, rollout_statistics

ROLLOUT = RolloutSection(samples_per_question=3, temperature=1.0, top_p=1.0, max_new_tokens=48, chunk_size=8)


class CountingGenerator:
    """The real generator, counting how many prompts it was asked to answer (to see resumes skip work)."""

    def __init__(self, generator):
        self.generator, self.prompts = generator, 0

    def generate(self, prompts, **kwargs):
        self.prompts += len(prompts)
        return self.generator.generate(prompts, **kwargs)


@pytest.fixture(scope="module")
def generator(format_model):
    return TransformersGenerator(format_model, device="cpu", batch_size=16)


def test_rollout_grades_every_sample(generator, selfplay_questions, tmp_path):
    questions = selfplay_questions[:12]
    records = rollout_questions(generator, questions, ROLLOUT, tmp_path / "rollouts.jsonl", seed=1)

    assert len(records) == 12 * 3
    assert read_jsonl(tmp_path / "rollouts.jsonl") == records
    by_id = {q.id: q for q in questions}
    for r in records:
        grade = grade_answer(r["trajectory"], by_id[r["question_id"]].answer, by_id[r["question_id"]].options)
        assert (r["predicted"], r["correct"]) == (grade.predicted, grade.correct)
        assert r["gold"] == by_id[r["question_id"]].answer and 0 < r["num_tokens"] <= 48
    assert {(r["question_id"], r["sample"]) for r in records} == {(q.id, s) for q in questions for s in range(3)}
    # The format model answers in format, right sometimes and wrong often: both kinds exist.
    assert any(r["correct"] for r in records) and not all(r["correct"] for r in records)

    stats = rollout_statistics(records, ROLLOUT.max_new_tokens)
    assert stats["questions"] == 12 and stats["samples"] == 36
    assert stats["pass@1"] == pytest.approx(sum(r["correct"] for r in records) / 36)
    assert stats["pass@1"] <= stats["pass@k"] <= 1
    assert stats["all_wrong"] == pytest.approx(1 - stats["pass@k"])
    assert 0 <= stats["all_right"] <= stats["pass@1"]


def test_rollout_resumes_and_redoes_torn_work(generator, selfplay_questions, tmp_path):
    path = tmp_path / "rollouts.jsonl"
    counting = CountingGenerator(generator)
    first = rollout_questions(counting, selfplay_questions[:4], ROLLOUT, path)
    assert counting.prompts == 4
    # A crash mid-write: the last question has only part of its samples and a torn line.
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:-2]) + '\n{"question_id": "to', encoding="utf-8")

    again = rollout_questions(counting, selfplay_questions[:6], ROLLOUT, path)
    assert counting.prompts == 4 + 3  # the torn question and the two new ones, nothing else
    assert again[:9] == first[:9]
    assert len(read_jsonl(path)) == len(again) == 6 * 3


def test_correction_keeps_only_verified_corrections(generator, selfplay_questions, tmp_path):
    questions = selfplay_questions[:16]
    records = rollout_questions(generator, questions, ROLLOUT, tmp_path / "rollouts.jsonl", seed=2)
    wrong = [r for r in records if not r["correct"]]
    config = CorrectionSection(attempts=2, temperature=1.0)
    by_id = {q.id: q for q in questions}
    corrections = correct_trajectories(generator, by_id, wrong, config, tmp_path / "corrections.jsonl", max_new_tokens=48)

    assert [(c["question_id"], c["sample"]) for c in corrections] == [(r["question_id"], r["sample"]) for r in wrong]
    for c in corrections:
        question = by_id[c["question_id"]]
        graded = [grade_answer(a["text"], question.answer, question.options).correct for a in c["attempts"]]
        assert graded == [a["correct"] for a in c["attempts"]]
        if c["corrected"]:
            # Kept: the text reaches gold, and no attempt is made after the first verified one.
            assert graded[-1] and not any(graded[:-1]) and c["correction"] == c["attempts"][-1]["text"]
        else:
            assert c["correction"] is None and len(graded) == 2 and not any(graded)
    kept = sum(c["corrected"] for c in corrections)
    assert 0 < kept < len(corrections), "expected both verified and failed corrections from the format model"
    stats = correction_statistics(corrections, 2)
    assert stats["corrected"] == kept and sum(stats["corrected_at_attempt"]) == kept

    # A rerun finds every trajectory done and generates nothing.
    counting = CountingGenerator(generator)
    assert correct_trajectories(counting, by_id, wrong, config, tmp_path / "corrections.jsonl") == corrections
    assert counting.prompts == 0


def test_run_rollout_refuses_to_mix_settings(format_model, selfplay_questions, tmp_path):
    from medcritical.modeling.config import GenerationConfig
    from medcritical.selfplay.step import run_rollout

    config = SelfPlayConfig(rollout=ROLLOUT, correction=CorrectionSection(attempts=1))
    stats = run_rollout(config, GenerationConfig(), selfplay_questions[:4], format_model, tmp_path, device="cpu")
    assert json.loads((tmp_path / "rollout_stats.json").read_text())["rollout"] == stats["rollout"]
    with pytest.raises(ValueError, match="other settings.*temperature"):
        changed = config.model_copy(update={"rollout": ROLLOUT.model_copy(update={"temperature": 0.5})})
        run_rollout(changed, GenerationConfig(), selfplay_questions[:4], format_model, tmp_path, device="cpu")
