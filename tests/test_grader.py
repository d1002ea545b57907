"""The one grader against its labelled corpus, and its API contract.

tests/data/grader_corpus.jsonl holds hand-labelled outputs in the styles of real students and
teachers (Qwen2.5-Instruct, QwQ / DeepSeek-R1, HuatuoGPT-o1, this project's SFT student), on real
CMExam questions; each row names the rule of docs/grader.md it exercises. Run with ``-s`` (or
``-rA``) to see the agreement table.
"""

import json
from collections import defaultdict
from pathlib import Path

import pytest

from medcritical.grader import (
    AMBIGUOUS,
    ANSWERED,
    EMPTY,
    INVALID,
    TRUNCATED,
    Grade,
    extract_answer_letters,
    final_answer_text,
    grade_answer,
)

CORPUS = Path(__file__).parent / "data" / "grader_corpus.jsonl"
ROWS = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
RULES = {
    "final-part", "truncated", "statement", "letter-forms", "boxed", "postfix", "line-end",
    "explicit-wins", "last-wins", "negation", "hedge", "bare-line", "option-text", "invalid", "empty",
}  # fmt: skip


def _agrees(row) -> tuple[bool, Grade]:
    grade = grade_answer(row["output"], row["gold"], row["options"])
    return grade.predicted == row["expected"] and grade.status == row["status"], grade


def _table(key: str) -> list[str]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in ROWS:
        counts[row[key]][0] += _agrees(row)[0]
        counts[row[key]][1] += 1
    return [f"  {name:<16} {ok:>4}/{n:<4} {100 * ok / n:6.1f}%" for name, (ok, n) in sorted(counts.items())]


def test_corpus_is_large_varied_and_covers_every_rule_both_ways():
    assert len(ROWS) >= 300
    assert len({row["id"] for row in ROWS}) == len(ROWS)
    assert {row["rule"] for row in ROWS} == RULES
    for rule in RULES - {"empty", "invalid", "truncated"}:
        cases = [row for row in ROWS if row["rule"] == rule]
        # positive: a case that reads letters; negative: one that reads none. For explicit-wins and
        # last-wins the negatives are the letters a naive reading would take, labelled with the right ones.
        assert any(row["expected"] for row in cases), rule
        assert any(row["status"] != ANSWERED for row in cases) or rule in {"explicit-wins", "last-wins"}, rule
    styles = {row["style"].rsplit("-", 1)[0] for row in ROWS}
    assert {"qwen2.5", "qwq", "deepseek-r1", "huatuo-o1", "student"} <= styles
    assert any(len(row["expected"]) > 1 for row in ROWS)
    for row in ROWS:
        assert set(row["expected"]) <= set(row["options"]), row["id"]


def test_grader_agrees_with_the_labelled_corpus():
    misses = []
    for row in ROWS:
        ok, grade = _agrees(row)
        if not ok:
            misses.append(
                f"  {row['id']} [{row['rule']} / {row['style']}] expected {row['expected']!r} {row['status']}, "
                f"got {grade.predicted!r} {grade.status} (decided by rule {grade.rule!r}): {row['output'][:80]!r}"
            )
    agreed = len(ROWS) - len(misses)
    report = [f"grader agreement with {CORPUS.name}: {agreed}/{len(ROWS)} = {100 * agreed / len(ROWS):.1f}%"]
    report += ["by rule:", *_table("rule"), "by style:", *_table("style")]
    print("\n" + "\n".join(report + (["misses:", *misses] if misses else [])))
    assert not misses, "\n".join(misses)


@pytest.mark.parametrize(
    "status,output",
    [
        (ANSWERED, "答案：C"),
        (EMPTY, "no idea"),
        (AMBIGUOUS, "答案：C或D"),
        (TRUNCATED, "<think>出血量"),
        (INVALID, "答案：F"),
    ],
)
def test_every_status_grades_wrong_except_answered(status, output):
    grade = grade_answer(
        output, "C", {"A": "原发病", "B": "出血部位", "C": "出血量", "D": "在胃内停留时间", "E": "以上均非"}
    )
    assert grade.status == status
    assert grade.correct == (status == ANSWERED)
    assert (grade.predicted != "") == (status == ANSWERED)
    assert grade.rule


def test_exact_set_match_and_order_independence():
    assert grade_answer("答案：CA", "AC", "ABCDE").correct
    assert not grade_answer("答案：A", "AC", "ABCDE").correct  # a subset is wrong
    assert not grade_answer("答案：ACD", "AC", "ABCDE").correct  # a superset is wrong
    assert grade_answer("答案：ACD", "AC", "ABCDE").predicted == "ACD"


def test_letters_only_options_read_no_option_text():
    options = {"A": "原发病", "B": "出血部位", "C": "出血量", "D": "在胃内停留时间", "E": "以上均非"}
    assert grade_answer("答案：出血量", "C", options).predicted == "C"
    assert grade_answer("答案：出血量", "C", list(options)).status == EMPTY
    assert extract_answer_letters("答案：c", "ABCDE") == "C"


def test_no_answer_is_wrong_even_when_gold_is_empty():
    assert not grade_answer("no idea", "", "ABCDE").correct


def test_final_answer_text_is_what_follows_the_last_think_end():
    assert final_answer_text("<think>a</think>b</think>c") == "c"
    assert final_answer_text("答案：C") == "答案：C"
