"""Format diagnostics: failure shares, answers given beside gold, the constant-answer floor."""

import pytest

from medcritical.analysis.diagnostics import diagnose_rollouts, diagnostics_line, format_diagnostics
from medcritical.evaluation.evaluate import grade_mcq
from medcritical.evaluation.report import markdown_report
from medcritical.orchestration.report import _format_table


def test_statuses_truncation_and_constant_floor(bundled):
    questions = [q for q in bundled if not q.is_multi_answer][:5]
    right = questions[0].answer
    outputs = {
        questions[0].id: {"output": f"<think>ok</think>答案：{right}", "num_tokens": 20},
        questions[1].id: {"output": "<think>still thinking about A and", "num_tokens": 12},  # unclosed <think>
        questions[2].id: {"output": "无法判断", "num_tokens": 64},  # no answer, ran out of tokens
        questions[3].id: {"output": "我不知道", "num_tokens": 5},  # no answer, stopped by itself
        # questions[4]: no output at all
    }
    graded = grade_mcq(questions, outputs, max_new_tokens=64)
    assert [row["status"] for row in graded] == ["answered", "truncated", "truncated", "empty", "empty"]
    assert [row["hit_token_limit"] for row in graded] == [False, False, True, False, False]
    d = format_diagnostics(graded)
    assert d["counts"] == {"answered": 1, "empty": 2, "truncated": 2, "ambiguous": 0, "invalid": 0}
    assert sum(d["shares"].values()) == pytest.approx(1.0)
    assert d["hit_token_limit"] == pytest.approx(0.2)
    assert d["predicted"] == {"(none)": 4, right: 1}
    golds = [q.answer for q in questions]
    best = max(set(golds), key=golds.count)
    assert d["best_constant"] == {"answer": best, "accuracy": golds.count(best) / 5}
    assert "truncated 40.0%" in diagnostics_line(d) and "hit token limit 20.0%" in diagnostics_line(d)


def test_one_letter_model_is_visible_in_the_reports(bundled):
    questions = bundled[:40]
    graded = grade_mcq(questions, {q.id: {"output": "答案：C", "num_tokens": 3} for q in questions})
    d = format_diagnostics(graded)
    assert d["predicted"] == {"C": 40} and d["shares"]["answered"] == 1.0
    report = {"protocol": "mcq", "accuracy": 0.25, "correct": 10, "n": 40, "ci95": [0.1, 0.4], "by": {}, "format": d}
    md = markdown_report(report)
    assert "## Answer format (mcq)" in md and "| C | 40 |" in md and "Always answering" in md
    table = "\n".join(_format_table({"base": None, "sft": report}))
    assert "| sft | 100.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | C 40 |" in table


def test_rollout_diagnostics_regrade_the_trajectories(bundled):
    q = bundled[0]
    records = [
        {"question_id": q.id, "trajectory": f"答案：{q.answer}", "num_tokens": 4},
        {"question_id": q.id, "trajectory": "<think>long", "num_tokens": 32},
    ]
    d = diagnose_rollouts(records, {q.id: q}, max_new_tokens=32)
    assert d["counts"]["answered"] == 1 and d["counts"]["truncated"] == 1 and d["hit_token_limit"] == 0.5
