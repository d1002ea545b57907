"""The one grader, on outputs shaped like real model answers (Qwen2.5, HuatuoGPT-o1, QwQ styles)."""

import pytest

from medcritical.grader import extract_answer_letters, grade_answer

ABCDE = "ABCDE"

CASES = [
    # (output, expected letters)
    ("答案：B", "B"),
    ("答案是 A、C", "AC"),
    ("正确答案为AC", "AC"),
    ("综上所述，故选E。", "E"),
    ("选 D", "D"),
    ("Answer: (B)", "B"),
    ("After weighing each option, the answer is C.", "C"),
    ("ABE", "ABE"),
    ("A,B,E", "ABE"),
    ("A、B、E", "ABE"),
    ("A和C", "AC"),
    ("**答案：D**", "D"),
    ("最终答案：\\boxed{C}", "C"),
    ("答案：Ｂ", "B"),  # full-width letter
    # QwQ-style: long reasoning that discusses every option, then the conclusion after </think>.
    (
        "<think>\n首先看选项A，原发病不是决定因素。选项B出血部位也不是。答案应该是C吗？"
        "再想想D，在胃内停留时间决定颜色。所以答案：C\n</think>\n\n上消化道出血的表现取决于出血量。\n\n答案：C",
        "C",
    ),
    # Only the text after the last </think> counts: the reasoning's "答案：A" is a distractor.
    ("<think>初步判断答案：A，但A项是原发病，不对。</think>\n正确答案是B", "B"),
    # Several statements: the last one wins.
    ("一开始我认为答案是A。\n但复核后发现错误，答案是D。", "D"),
    ("答案：B\n\n解析：B项正确，A项错误，C项、E项均不符合。", "B"),
    # Multi-answer in prose, English model.
    ("<think>Options A and C both describe obstruction.</think>\nThe correct answers are A and C.\nAnswer: A, C", "AC"),
    # Explanation mentioning letters but stating no answer: no prediction.
    ("A项原发病不是决定因素，C项出血量才是关键。", ""),
    ("<think>答案是B</think>\n我不确定。", ""),
    ("", ""),
    # "选项A" names an option in reasoning; it is not "选 A".
    ("选项A错误，选项B错误。答案：E", "E"),
    # A statement with a letter outside the options makes the prediction empty (wrong), not truncated.
    ("答案：F", ""),
    ("答案：A、F", ""),
    # "answer is" followed by an English word, not a letter.
    ("The answer is Acute pancreatitis.", ""),
    ("答案：B。因为饱餐后上腹痛伴反跳痛提示急性胰腺炎。", "B"),
]


@pytest.mark.parametrize("output,expected", CASES)
def test_extract_answer_letters(output, expected):
    assert extract_answer_letters(output, ABCDE) == expected


def test_exact_set_match_and_order_independence():
    assert grade_answer("答案：CA", "AC", ABCDE).correct
    assert not grade_answer("答案：A", "AC", ABCDE).correct  # a subset is wrong
    assert not grade_answer("答案：ACD", "AC", ABCDE).correct  # a superset is wrong
    assert grade_answer("答案：ACD", "AC", ABCDE).predicted == "ACD"


def test_letters_outside_options_are_wrong_for_four_option_questions():
    grade = grade_answer("答案：E", "A", "ABCD")
    assert grade.predicted == "" and not grade.correct


def test_no_answer_is_wrong_even_when_gold_is_empty():
    assert not grade_answer("no idea", "", ABCDE).correct
