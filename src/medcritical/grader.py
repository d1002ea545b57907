"""The one grader: which answer letters a model's free text states, and whether they match gold.

Distillation filtering, rollout grading and evaluation all call `grade_answer`, so a change of rules
here moves every number in the project at once (and only here).

Rules:
- Only the text after the last ``</think>`` counts when there is one (the reasoning may weigh every
  option; the conclusion is what is graded).
- An answer statement is a cue (答案：, 答案是, 正确答案为, 故选, 选, Answer:, the answer is, \\boxed{})
  followed by letters, or a line holding only letters (``ABE``, ``A,B,E``, ``A、B、E``, ``A和C``).
- When several statements appear, the last one wins.
- Letters outside the question's options, or no statement at all, give an empty prediction: wrong.
- Exact letter-set match.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable

THINK_END = "</think>"
THINK_START = "<think>"

# Grade.status values
ANSWERED, EMPTY, AMBIGUOUS, TRUNCATED, INVALID = "answered", "empty", "ambiguous", "truncated", "invalid"

# Letters joined by nothing, spaces, commas, 、, /, 和/及/与, "and" — then no further latin letter, so
# "答案：B Because" is B and "answer is Acute" is no answer.
_SEP = r"(?:\s*(?:[,，、/&+]|和|及|与|或|\band\b)\s*|\s*)"
_LETTERS = rf"(?P<letters>[A-Z](?:{_SEP}[A-Z])*)(?![A-Za-z])"
_OPEN = r"[\s*_]*[(（\[【]?\s*"
_CUES = [
    # 答案：B / 正确答案为AC / 最终答案是 A、C / 答案应选D
    r"答案\s*(?:应该|应当|应)?\s*(?:是|为|选|選)?\s*[:：]?",
    # 故选E / 所以选择 B / 选 D  (not 选项A, which names an option in reasoning)
    r"选(?:择)?(?!项)\s*[:：]?",
    # Answer: (B) / Final answer: B / the correct answer is C / answer is option C
    r"(?i:answer)\s*(?i:is|:|should\s+be)?\s*:?\s*(?i:options?)?",
    r"\\boxed\{\s*(?:\\text\{)?",
]
_STATEMENT = re.compile(rf"(?:{'|'.join(_CUES)}){_OPEN}{_LETTERS}")
_LETTERS_ONLY_LINE = re.compile(
    rf"^[\s*_#>]*[(（\[【]?\s*{_LETTERS}\s*[)）\]】]?[\s*_。.]*$", re.MULTILINE
)


@dataclass(frozen=True)
class Grade:
    predicted: str  # sorted letters as one string, "" when no valid answer was stated
    correct: bool
    status: str = ANSWERED  # ANSWERED, EMPTY, AMBIGUOUS, TRUNCATED or INVALID
    rule: str = ""  # the rule that decided (placeholder until the grader rewrite)


def final_answer_text(output: str) -> str:
    """The part of a model output that states the answer: after the last </think> if any."""
    head, sep, tail = output.rpartition(THINK_END)
    return tail if sep else output


def extract_answer_letters(output: str, options: Iterable[str]) -> str:
    """Letters of the last answer statement in `output`, sorted; "" if none or any is not an option."""
    text = unicodedata.normalize("NFKC", final_answer_text(output))
    last: tuple[int, str] | None = None
    for pattern in (_STATEMENT, _LETTERS_ONLY_LINE):
        for match in pattern.finditer(text):
            if last is None or match.start() >= last[0]:
                last = (match.start(), match.group("letters"))
    if last is None:
        return ""
    letters = set(re.findall(r"[A-Z]", last[1]))
    if not letters <= set(options):
        return ""
    return "".join(sorted(letters))


def grade_answer(output: str, gold: str, options: Iterable[str]) -> Grade:
    """Grade one free-text output against the gold letter set (e.g. "AC")."""
    predicted = extract_answer_letters(output, options)
    if output.rfind(THINK_START) > output.rfind(THINK_END):  # unclosed <think>: cut off mid-reasoning
        return Grade(predicted="", correct=False, status=TRUNCATED, rule="unclosed-think")
    status = ANSWERED if predicted else EMPTY
    return Grade(predicted=predicted, correct=bool(predicted) and set(predicted) == set(gold), status=status)
