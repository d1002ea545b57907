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


ABDOMEN = {"A": "急性胃炎", "B": "急性胰腺炎", "C": "急性肝炎", "D": "右肾结石", "E": "肝癌"}


def test_a_reply_cut_off_in_its_option_analysis_has_not_answered():
    """Issue 25: a reply that hit the token limit while listing options ended on "B. 急性胰腺炎", and the
    lone option line was read as the answer B (here gold: a truncated reply graded right). Under an
    option-by-option analysis such a line is the option analysed next, not an answer; with the token
    limit hit, the diagnostics then count the reply as truncated."""
    from medcritical.analysis.diagnostics import row_status

    cut = (
        "这道题考查急腹症的鉴别诊断。患者男性，饱餐后出现上腹部持续性疼痛，伴恶心呕吐，查体上腹压痛、反跳痛。\n\n"
        "选项分析：\n\n"
        "A. 急性胃炎：多有不洁饮食史，以上腹痛、恶心呕吐为主，一般无腹膜刺激征，与本例不符。\n"
        "B. 急性胰腺炎"
    )
    grade = grade_answer(cut, "B", ABDOMEN)
    assert (grade.predicted, grade.status, grade.correct) == ("", EMPTY, False)
    assert row_status(grade.status, grade.predicted, hit_limit=True) == TRUNCATED
    for heading in (
        "我们来逐一分析各个选项：",
        "各选项分析如下：",
        "下面对各选项进行分析：",
        "Let's analyze each option:",
    ):
        assert grade_answer(f"饱餐后上腹痛。\n\n{heading}\n\n**A. 急性胃炎**", "B", ABDOMEN).status == EMPTY, heading
    assert grade_answer("选项分析：\nA.", "B", ABDOMEN).status == EMPTY  # cut off after the item's label
    # Before the fix, the last option line beat the answer given above the analysis ("B" read as C).
    assert grade_answer("B\n\n解析：\n选项分析：\nA. 急性胃炎：不符。\nC. 急性肝炎", "B", ABDOMEN).predicted == "B"


@pytest.mark.parametrize(
    "reply,letters",
    [
        ("A", "A"),
        ("答案：A", "A"),
        ("**A**", "A"),
        ("A. 急性胃炎", "A"),  # a lone option line with no analysis above it is still an answer
        ("A\n\n解析：进食不洁食物后上腹痛、呕吐，无腹膜刺激征，考虑急性胃炎。", "A"),
        ("答案：A\n\n选项分析：\nA. 急性胃炎：符合。\nB. 急性胰腺炎", "A"),
        ("选项分析：\nA. 急性胃炎：符合。\nB. 急性胰腺炎：不符。\n\n综上所述：\n\nA. 急性胃炎", "A"),
        ("选项分析：\nA. 急性胃炎：符合。\nB. 急性胰腺炎：不符。\n\n**A**", "A"),
    ],
)
def test_short_answers_and_concluded_analyses_are_still_read(reply, letters):
    assert grade_answer(reply, "A", ABDOMEN).predicted == letters
