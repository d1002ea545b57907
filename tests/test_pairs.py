"""Preference pairs: format, filters, held-out split, the "no pairs" result, and the `pairs` step."""

import json

import pytest
from trl.data_utils import is_conversational

from medcritical.grader import grade_answer
from medcritical.prompts import mcq_messages
from medcritical.selfplay.config import PairsSection, SelfPlaySection
from medcritical.selfplay.pairs import answer_level, build_preference_pairs
from medcritical.selfplay.run import make_pairs


def sample(question, n, text, tokens=10):
    """A rollout record for `text`, graded by the real grader."""
    grade = grade_answer(text, question.answer, question.options)
    return {
        "question_id": question.id,
        "sample": n,
        "trajectory": text,
        "predicted": grade.predicted,
        "gold": question.answer,
        "correct": grade.correct,
        "num_tokens": tokens,
    }


def wrong_letter(question):
    return next(letter for letter in question.options if letter not in question.answer)


def correction(question, n, text, tokens=10):
    """A correction record whose accepted rewrite (the chosen text) is `text` when it reaches gold."""
    ok = grade_answer(text, question.answer, question.options).correct
    return {
        "question_id": question.id,
        "sample": n,
        "corrector": "self",
        "attempts": [],
        "corrected": ok,
        "correction": "<think>之前的回答错了</think>\n答案：" + question.answer if ok else None,
        "chosen": text if ok else None,
        "chosen_tokens": tokens if ok else None,
    }


@pytest.fixture
def questions(bundled):
    return [q for q in bundled if not q.is_multi_answer][:6]


def test_pairs_are_trl_preference_rows_with_the_original_prompt(questions):
    q = questions[0]
    right, wrong = f"<think>想一想</think>\n答案：{q.answer}", f"<think>猜</think>\n答案：{wrong_letter(q)}"
    rollouts = [sample(q, 0, wrong), sample(q, 1, right)]
    train, heldout, stats = build_preference_pairs(
        [q], rollouts, [correction(q, 0, "<think>重新想</think>\n答案：" + q.answer)], PairsSection()
    )
    assert heldout == [] and stats["train_pairs"] == 1  # one question: nothing can be held out
    pair = train[0]
    assert is_conversational(pair)
    assert pair["prompt"] == mcq_messages(q)  # what the student sees, not the correction prompt
    # chosen is the standalone rewrite, never the correction text that talks about the earlier answer
    assert pair["chosen"] == [{"role": "assistant", "content": "<think>重新想</think>\n答案：" + q.answer}]
    assert pair["rejected"] == [{"role": "assistant", "content": wrong}]
    assert pair["chosen_source"] == "correction"  # a verified correction beats a correct sample


def test_filters_dedup_length_ratio_cap_and_source_switch(questions):
    q = questions[0]
    bad = wrong_letter(q)
    rollouts = [
        sample(q, 0, f"<think>a</think>\n答案：{bad}", tokens=10),
        sample(q, 1, f"<think>a</think>\n答案：{bad}", tokens=10),  # duplicate rejected
        sample(q, 2, f"<think>b</think>\n答案：{bad}", tokens=4),  # chosen would be > 2x longer
        sample(q, 3, f"<think>c</think>\n答案：{bad}", tokens=10),
        sample(q, 4, f"<think>d</think>\n答案：{bad}", tokens=10),
        sample(q, 5, f"<think>ok</think>\n答案：{q.answer}", tokens=10),
    ]
    corrections = [
        correction(q, 3, f"<think>fix</think>\n答案：{q.answer}", tokens=12),
        correction(q, 4, f"<think>still</think>\n答案：{bad}"),
    ]  # failed: not a chosen
    config = PairsSection(max_length_ratio=2.0, max_pairs_per_question=2)
    train, _, stats = build_preference_pairs([q], rollouts, corrections, config)
    assert stats["dropped"] == {
        "duplicate_rejected": 1,
        "refers_back": 0,
        "chosen_format": 0,
        "no_chosen": 0,
        "too_long": 1,
        "duplicate_pair": 0,
        "over_cap": 1,
        "reasoning_disagrees": 0,
    }
    assert [p["chosen_source"] for p in train] == ["correction", "sample"]
    for p in train:
        assert p["chosen_tokens"] <= 2.0 * p["rejected_tokens"]
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert (
            grade_answer(chosen, q.answer, q.options).correct
            and not grade_answer(rejected, q.answer, q.options).correct
        )

    only_corrections = PairsSection(use_correct_samples=False, max_pairs_per_question=4)
    train, _, stats = build_preference_pairs([q], rollouts, corrections, only_corrections)
    assert [p["rejected_sample"] for p in train] == [3] and stats["dropped"]["no_chosen"] == 3


def test_heldout_split_is_by_whole_question(questions):
    rollouts, corrections = [], []
    for q in questions:
        rollouts += [
            sample(q, 0, f"答案：{wrong_letter(q)}"),
            sample(q, 1, f"<think>x</think>答案：{wrong_letter(q)}"),
            sample(q, 2, f"<think>y</think>答案：{q.answer}"),
        ]
    train, heldout, stats = build_preference_pairs(
        questions, rollouts, corrections, PairsSection(heldout_fraction=0.34), seed=3
    )
    assert stats["heldout_questions"] == 2 and len(heldout) == 4 and len(train) == 8
    assert not {p["question_id"] for p in train} & {p["question_id"] for p in heldout}
    # Seeded and independent of input order.
    again = build_preference_pairs(
        questions[::-1], rollouts[::-1], corrections, PairsSection(heldout_fraction=0.34), seed=3
    )
    assert {p["question_id"] for p in again[1]} == {p["question_id"] for p in heldout}


def test_no_wrong_trajectory_is_an_explicit_no_pairs_result(questions):
    rollouts = [sample(q, 0, f"答案：{q.answer}") for q in questions]
    train, heldout, stats = build_preference_pairs(questions, rollouts, [], PairsSection())
    assert train == heldout == [] and "every sample was correct" in stats["no_pairs"]


def test_pairs_step_rebuilds_from_a_rollout_folder(questions, tmp_path):
    rollout_dir = tmp_path / "rollout"
    rollout_dir.mkdir()
    q = questions[0]
    rows = [sample(q, 0, f"答案：{wrong_letter(q)}"), sample(q, 1, f"<think>y</think>答案：{q.answer}")]
    (rollout_dir / "rollouts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    stats = make_pairs(SelfPlaySection(), questions, rollout_dir, tmp_path / "pairs")
    assert stats["train_pairs"] == 1 and "no_pairs" not in stats
    lines = (tmp_path / "pairs" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["chosen_source"] == "sample"
    assert (tmp_path / "pairs" / "pairs_heldout.jsonl").read_text() == ""
    with pytest.raises(FileNotFoundError, match="medcritical rollout"):
        make_pairs(SelfPlaySection(), questions, tmp_path / "nowhere", tmp_path / "pairs")


def test_answer_level_pairs_share_the_chosen_reasoning_and_differ_in_the_answer(questions):
    """Issue 24 item 8: answer-level pairs dropped <think> on both sides (teaching to skip reasoning). Both
    sides now carry the chosen reasoning; only the final answer statement differs."""
    q = questions[0]
    bad = wrong_letter(q)
    rollouts = [
        sample(q, 0, f"<think>长长的推理一</think>\n答案：{bad}", tokens=30),
        sample(q, 1, f"<think>长长的推理二</think>\n答案：{bad}", tokens=30),  # same statement: one rejected
        sample(q, 2, f"<think>对的推理</think>\n答案：{q.answer}", tokens=90),  # 3x longer: fine at answer level
    ]
    train, _, stats = build_preference_pairs([q], rollouts, [], PairsSection(level="answer"))
    assert stats["level"] == "answer" and stats["dropped"]["duplicate_rejected"] == 1 and len(train) == 1
    pair = train[0]
    assert pair["chosen"][0]["content"] == f"<think>对的推理</think>\n答案：{q.answer}"
    assert pair["rejected"][0]["content"] == f"<think>对的推理</think>\n答案：{bad}"
    assert pair["level"] == "answer" and pair["same_letters"] is False
    thought, _, _ = build_preference_pairs([q], rollouts, [], PairsSection(level="thought"))
    assert thought == []  # at thought level the 3x longer chosen is filtered out


def test_answer_level_sides_differ_only_after_the_shared_prefix():
    """The rejected side put one line break after </think> whatever the chosen had, and the chosen kept its
    trailing whitespace: the two sides then differed in tokens outside the answer span."""
    chosen, rejected = answer_level("<think>推理</think>\n\n答案：A\n", "<think>别的</think> 答案：B")
    assert (chosen, rejected) == ("<think>推理</think>\n\n答案：A", "<think>推理</think>\n\n答案：B")
    assert answer_level("答案：A", "其他\n答案：B") == ("答案：A", "答案：B")  # no reasoning block: answers alone


def test_a_chosen_whose_reasoning_concludes_another_letter_is_never_chosen(questions):
    """Issue 24 item 8: a chosen answer's reasoning was never checked against its letter; a rewrite whose
    reasoning concludes one option and whose answer states another taught exactly that mismatch."""
    q = questions[0]
    bad = wrong_letter(q)
    rollouts = [
        sample(q, 0, f"<think>推理</think>\n答案：{bad}"),
        sample(q, 1, f"<think>分析各项，故选{bad}。</think>\n答案：{q.answer}"),  # reasoning says bad
        sample(q, 2, f"<think>分析各项，故选{q.answer}。</think>\n答案：{q.answer}"),  # agrees
        sample(q, 3, f"<think>推理</think>\n答案：{bad}。"),
    ]
    corrections = [correction(q, 3, f"<think>重新分析，答案是{bad}</think>\n答案：{q.answer}")]
    train, _, stats = build_preference_pairs([q], rollouts, corrections, PairsSection(heldout_fraction=0.0))
    assert stats["dropped"]["reasoning_disagrees"] == 2  # the disagreeing sample and the correction
    assert train and all(f"故选{q.answer}" in p["chosen"][0]["content"] for p in train)
    assert {p["chosen_source"] for p in train} == {"sample"}


def test_pair_diagnostics_lengths_sources_and_same_letters(questions):
    q = questions[0]
    bad = wrong_letter(q)
    rollouts = [
        sample(q, 0, f"<think>a</think>\n答案：{bad}", tokens=10),
        sample(q, 1, f"<think>bb</think>\n答案：{bad}", tokens=10),
        sample(q, 2, f"<think>正确的</think>\n答案：{q.answer}", tokens=15),
    ]
    corrections = [correction(q, 0, f"<think>改写后的独立解答</think>\n答案：{q.answer}", tokens=12)]
    train, _, stats = build_preference_pairs([q], rollouts, corrections, PairsSection())
    d = stats["diagnostics"]
    assert d["pairs"] == 2 and d["from_correction_share"] == 0.5 and d["from_sample_share"] == 0.5
    assert d["same_letters_share"] == 0.0
    assert d["chosen_tokens"]["min"] == 12 and d["chosen_tokens"]["max"] == 15 and d["rejected_tokens"]["median"] == 10
    assert d["tokens_ratio"]["max"] == pytest.approx(1.5)
    ratios = sorted(len(p["chosen"][0]["content"]) / len(p["rejected"][0]["content"]) for p in train)
    assert d["chars_ratio"]["min"] == pytest.approx(ratios[0]) and d["chars_ratio"]["max"] == pytest.approx(ratios[-1])


def test_a_correct_sample_that_refers_back_or_breaks_the_format_is_never_chosen(questions):
    q = questions[0]
    rollouts = [
        sample(q, 0, f"<think>x</think>\n答案：{wrong_letter(q)}"),
        sample(q, 1, f"<think>上一次我选错了</think>\n答案：{q.answer}"),
    ]
    train, _, stats = build_preference_pairs([q], rollouts, [], PairsSection())
    assert train == [] and stats["dropped"]["refers_back"] == 1 and stats["dropped"]["no_chosen"] == 1

    # The right letter without the trained reasoning block (the grader reads it; the format is missing).
    bare = [rollouts[0], sample(q, 1, f"答案：{q.answer}")]
    train, _, stats = build_preference_pairs([q], bare, [], PairsSection())
    assert train == [] and stats["dropped"]["chosen_format"] == 1
    # An unclosed <think> is a truncated output: the grader counts it wrong, so it is never a chosen either.
    unclosed = [rollouts[0], sample(q, 1, f"<think>没有结束的推理 答案：{q.answer}")]
    assert build_preference_pairs([q], unclosed, [], PairsSection())[0] == []
