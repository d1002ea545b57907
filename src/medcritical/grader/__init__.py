"""The one grader: which answer letters a model's free text states, and whether they match gold.

Distillation filtering, rollout grading and evaluation all call `grade_answer`, so a change of rules
here moves every number in the project at once (and only here). The rules, one a row with examples,
are in docs/grader.md; each rule id there is the ``Grade.rule`` that decided, and the labelled corpus
tests/data/grader_corpus.jsonl checks every one of them.

In short:
- ``final-part``: only the text after the last ``</think>`` (or HuatuoGPT's ``## Final Response``)
  counts; ``truncated``: an unclosed ``<think>`` (or ``## Thinking`` without a final response) is no
  answer.
- An explicit answer statement is a cue (答案：, 【答案】, 答：, 正确选项是, 故选, the answer is,
  the correct option is, Answers:, ``\\boxed{}``) followed by letters (``statement``), or letters
  followed by a verdict (C is correct, C为正确答案: ``postfix``). Its letters end at the end of
  their line or sentence. Negated, hypothetical and questioning mentions are not statements.
- The last explicit statement wins. Only without one does a line holding only letters count
  (``bare-line``), and only without any letters does the text of an option stated as the answer
  (``option-text``). Inside an option-by-option analysis ("选项分析：" up to a conclusion), a line
  "A. 发热" is the option analysed next, not an answer: a reply cut off there has not answered.
- "A或B", "A or B", "ACD/ACDE" make the answer ambiguous ("A/C/D" lists ACD); letters that are not options make it invalid;
  both grade wrong, as does no answer at all.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from medcritical.grader.letters import Letters, read_letters

THINK_START, THINK_END = "<think>", "</think>"

# Grade.status values.
ANSWERED = "answered"
EMPTY = "empty"  # no answer statement, or nothing after </think>
AMBIGUOUS = "ambiguous"  # a hedge between letters ("A或B", "A or B", "ACD/ACDE")
TRUNCATED = "truncated"  # <think> never closed: the output stopped before its answer
INVALID = "invalid"  # letters stated that are not among the options

# HuatuoGPT-o1 writes "## Thinking ... ## Final Response ...": the same split as <think>...</think>.
_FINAL_HEADING = re.compile(r"^#+\s*Final Response\s*$", re.MULTILINE | re.IGNORECASE)
_THINKING_HEADING = re.compile(r"^#+\s*Thinking\s*$", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class Grade:
    predicted: str  # sorted letters as one string, "" unless status is ANSWERED
    correct: bool
    status: str = ANSWERED
    rule: str = ""  # id of the rule in docs/grader.md that decided


# --- Statements ---------------------------------------------------------------------------------

# Cues followed by the answer. Each ends where the letters (or option text) begin.
_CUES = [
    # 答案：B / 【答案】B / 正确答案为AC / 最终答案是 A、C / 答案应选D / 本题答案：C / 参考答案：C
    r"答案\s*(?:应该|应当|应|就|则|最终|可能|也|仍然?|还)?\s*(?:是|为|选(?!项)择?|選)?\s*[:：]?",
    r"【\s*答案?\s*】\s*[:：]?",
    # 答：B (a short answer prefix; not 回答 in prose)
    r"(?:^|(?<=[\s。；;]))答\s*[:：]",
    # 正确选项是C / 正确的选项为：C / 最佳选项：C / 正确的是C
    r"(?:正确|最佳|最合适|最恰当|最符合)的?(?:选项|选择|答案|是)\s*(?:应该|应当|应)?\s*(?:是|为)?\s*[:：]?",
    # 故选C / 应选C / 故本题选C / 所以选择 B / 选 D   (not 选项A, which names an option)
    r"选(?:择)?(?!项|择题)\s*[:：]?",
    # 答案不是A，而是C / 不是A而是C
    r"而是\s*(?:选)?",
    # Answer: (B) / Final answer: B / the correct answer is C / the answers are A and C
    (
        r"(?i:\banswers?)\s*"
        r"(?i:(?:is|are)(?:\s+(?:probably|likely|clearly))?\b|:|-|–|—|(?:should|would|will|must|could|may|might)\s+be\b)?"
        r"\s*:?\s*(?i:either\b)?"
    ),
    # the correct option is C / correct choice: C / the best option would be C
    (
        r"(?i:\b(?:correct|right|best|most\s+appropriate|most\s+likely|final)\s+"
        r"(?:options?|choices?|responses?|statements?))"
        r"\s*(?i:is|are|:|should\s+be|would\s+be)?\s*:?"
    ),
    # I choose C / I would choose C / I'll go with C / select C
    r"(?i:\b(?:choose|select|pick|go\s+with))\s*:?",
    # \boxed{C} / \boxed{\text{C}}
    r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{)?",
    # the answer is not B but E
    r"(?i:\bnot\s+(?:option\s+)?[A-Z]\b\)?,?\s+but(?:\s+rather)?)",
]
_CUE = re.compile("|".join(f"(?:{cue})" for cue in _CUES), re.MULTILINE)

# Letters followed by a verdict: "C is correct", "A and C are the correct answers", "C为正确答案",
# "选项C正确。" (not "C is incorrect", "C不正确", "C正确的说法是...").
_POSTFIX = re.compile(
    r"[ \t]*(?:"
    r"(?i:(?:is|are)\s+(?:the\s+)?(?:only\s+)?(?:correct|right|best)(?:\s+(?:answers?|options?|choices?))?)"
    r"|(?:项|选项)?[ \t]*(?:是|为)?[ \t]*(?:正确答案|正确选项|最佳答案|最佳选项|正确的?|对的)"
    r")(?=$|[\s.,;:!。，；！])",
    re.MULTILINE,
)
# Letters followed by a rejection are no answer ("Answer A is incorrect", "选A是错误的").
_REJECTED = re.compile(
    r"[ \t]*(?:(?i:(?:is|are)\s+(?:not|incorrect|wrong|false)\b)|(?:项|选项)?[ \t]*(?:是|为)?[ \t]*(?:错误|不正确|不对|错的?))"
)
# Where a postfix statement's letters may start: a sentence or clause start, or after a connective.
_POSTFIX_START = re.compile(
    r"(?:^|(?<=[\s。，,；;：:！!（(]))(?:(?:so|thus|hence|therefore|only|因此|所以|故|即|只有|仅|综上)[,，]?\s*)?",
    re.MULTILINE | re.IGNORECASE,
)

# A mention does not count when its clause is hypothetical ...
_HYPOTHETICAL = re.compile(
    r"如果|假如|假设|假若|若是|倘若|要是|万一|若(?!干)|\bif\b|\bsuppose|\bassum|\bunless\b|\bwhether\b",
    re.IGNORECASE,
)
# ... or someone else's choice ("有人会选A", "容易误选", "some might choose A") ...
_ATTRIBUTED = re.compile(r"有人|容易|\bsome(?:one)?\b|\bothers?\b|\bmany\b|\bmost\s+students\b|\btempt", re.IGNORECASE)
# ... negated just before the cue ("不选A", "不应选A", "并非选A", "not choose A") ...
_NEGATED = re.compile(r"(?:不|不应|不能|不可|不会|不要|并非|而非|非|误|错|\bnot|n't|\bnever)\s*$", re.IGNORECASE)
# ... and an option text mentioned in a negated clause ("不是原发病", "排除气胸", "not pneumothorax").
_MENTION_NEGATED = re.compile(r"不|非|排除|除外|\bnot\b|n't|\bno\b|\brule\s+out|\bexclud", re.IGNORECASE)
_CONCLUSION = re.compile(
    r"所以|因此|故|综上|总之|最终|但|而|(?i:therefore|so\b|thus|hence|overall|in\s+conclusion|but|however)"
)
_CLAUSE_START = re.compile(r"[。！？!?\n；;，,]|\.\s")
_SENTENCE_END = re.compile(r"[。！？!?\n；;]|\.(?:\s|$)")


def _clause_before(text: str, pos: int, boundary: re.Pattern = _CLAUSE_START) -> str:
    window = max(0, pos - 400)  # a clause or sentence is shorter; keeps long outputs linear
    start = max((m.end() for m in boundary.finditer(text, window, pos)), default=window)
    return text[start:pos]


def _hypothetical(text: str, start: int) -> bool:
    """Whether a mention at `start` sits in a condition or its consequence.

    "如果选A，…" and "若题目问颜色，则选D" are hypothetical; "如果选A，则无法解释反跳痛，所以答案是B" is
    not: a conclusion marker opens a new assertion. "Even if" concedes, it does not suppose.
    """
    clause = _clause_before(text, start)
    if _HYPOTHETICAL.search(clause) or _ATTRIBUTED.search(clause):
        return True
    sentence = re.sub(r"(?i)\beven\s+if\b|即使|即便", "", _clause_before(text, start, _SENTENCE_END))
    return bool(_HYPOTHETICAL.search(sentence)) and not _CONCLUSION.match(clause.strip())


def _sentence_after(text: str, pos: int) -> str:
    end = _SENTENCE_END.search(text, pos)
    return text[pos : end.end() if end else len(text)]


def _counts(text: str, start: int, cue_end: int, letters_end: int) -> bool:
    """Whether a statement at text[start:letters_end] is asserted (not negated, hypothetical, asked)."""
    if _hypothetical(text, start) or _HYPOTHETICAL.search(text[start:cue_end]):
        return False
    if _NEGATED.search(text[max(0, start - 4) : start]):
        return False
    return not re.search(r"[?？]\s*$|[吗呢][。.?？]?\s*$", _sentence_after(text, letters_end))


@dataclass(frozen=True)
class _Statement:
    start: int
    letters: Letters
    rule: str


def _statements(text: str, options: dict[str, str]) -> list[_Statement]:
    """Every explicit answer statement (prefix cue or postfix verdict), in order of position."""
    found: list[_Statement] = []
    for cue in _overlapping(_CUE, text):
        pos = cue.end()
        # "【答案】" / "Final answer:" may put the letters on the next line.
        if cue.group(0).rstrip().endswith((":", "：", "】")):
            pos += len(re.match(r"[ \t]*\n?[ \t]*\n?[ \t]*", text[pos:]).group(0))
        else:
            pos += len(re.match(r"[ \t]*", text[pos:]).group(0))
        letters = read_letters(text, pos, options)
        if letters is None or _REJECTED.match(text, letters.end):
            continue
        rule = "boxed" if cue.group(0).startswith("\\boxed") else "statement"
        if _counts(text, cue.start(), cue.end(), letters.end):
            found.append(_Statement(cue.start(), letters, rule))
    for start in _POSTFIX_START.finditer(text):
        letters = read_letters(text, start.end(), options, lower_ok=False)
        if letters is None or not _POSTFIX.match(text, letters.end):
            continue
        verdict_end = _POSTFIX.match(text, letters.end).end()
        if _counts(text, start.start(), start.end(), verdict_end):
            found.append(_Statement(start.start(), letters, "postfix"))
    # "A, B and C are correct" also holds "B and C are correct": keep the outermost reading.
    kept: list[_Statement] = []
    for statement in sorted(found, key=lambda s: (s.start, -s.letters.end)):
        if kept and statement.letters.end <= kept[-1].letters.end:
            continue
        kept.append(statement)
    return kept


def _overlapping(pattern: re.Pattern, text: str):
    """Matches of `pattern` starting at every position ("正确答案可能是" holds "答案可能是")."""
    pos = 0
    while (match := pattern.search(text, pos)) is not None:
        yield match
        pos = match.start() + 1


# A line holding only letters: "B", "**B**", "(B)", "A、C", "Option B", "B. 出血部位" (an echo).
_LINE_DECORATION = re.compile(r"^[\s#>*_\-•]*|[\s*_。.!！]*$")

# A line that opens an option-by-option analysis ("选项分析：", "逐项分析如下", "我们来分析各个选项",
# "Let's analyze each option:"). Below it a line "A. 发热" names the option about to be analysed, not the
# answer, until a line that concludes ("综上", "因此", "答案", "Therefore", ...).
_OPTIONS_WALK = re.compile(
    r"(?:选项|各项|逐项|逐一|逐个|各个?选项)\s*(?:分析|解析|评析|辨析|点评|排除|判断)"
    r"|分析\s*(?:一下)?\s*(?:各个?|每个|每一个?|所有|以下|下列)?\s*选项"
    r"|对\s*(?:各个?|每个|所有)?\s*选项\s*(?:进行)?\s*(?:逐一|逐个)?\s*(?:分析|解析)"
    r"|(?i:\boptions?[- ]analysis|\banalysis\s+of\s+(?:each|the|all)\s+(?:of\s+the\s+)?options"
    r"|\b(?:analy[sz]e|examine|evaluate|go\s+through|look\s+at)\s+(?:each|the|all)\s+(?:of\s+the\s+)?options?\b"
    r"|\boption[- ]by[- ]option)"
)
_WALK_END = re.compile(
    r"^[\s#>*_\-•]*(?:综上|总之|因此|所以|故|总结|结论|最终|答案|正确|【答案】|"
    r"(?i:therefore|in\s+(?:conclusion|summary)|overall|so\b|thus|hence|final|the\s+(?:correct\s+)?answer))"
)
# "A." / "A、" / "A：" / "(A)": a list item's label.
_ITEM_LABEL = re.compile(r"[A-Z]\s*[.．、:：)）]\s*[*_]*\s*$")


def _in_options_walk(lines: list[str]) -> list[bool]:
    """Per line: whether it sits in an option-by-option analysis (after its opening line, before a
    conclusion)."""
    walking, inside = False, []
    for line in lines:
        if _WALK_END.match(line):
            walking = False
        inside.append(walking)
        if _OPTIONS_WALK.search(line):
            walking = True
    return inside


def _bare_lines(text: str, options: dict[str, str]) -> list[_Statement]:
    letter_lines, echo_lines = [], []
    offset = 0
    lines = text.split("\n")
    for line, walking in zip(lines, _in_options_walk(lines)):
        body = _LINE_DECORATION.sub("", line)
        start = offset + len(line) - len(line.lstrip())
        offset += len(line) + 1
        letters = read_letters(body, 0, options, lower_ok=False) if body else None
        if letters is None:
            continue
        rest = body[letters.end :].strip(" \t.、:：,，-–—")
        statement = _Statement(start, letters, "bare-line")
        echo = len(letters.letters) == 1 and bool(rest) and _norm(rest) == _norm(options.get(letters.letters, "\0"))
        if walking and len(letters.letters) == 1 and (echo or _ITEM_LABEL.search(line.strip())):
            continue  # "选项分析：\nA. 发热": the option being analysed (a reply cut off here has not answered)
        if not rest:
            letter_lines.append(statement)
        elif echo:
            echo_lines.append(statement)
    # An echo line "C. 出血量" is an answer; several different ones are the options listed again.
    if len({s.letters.letters for s in echo_lines}) > 1:
        echo_lines = []
    return sorted(letter_lines + echo_lines, key=lambda s: s.start)


# --- Option text ---------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"[\s。.，,、；;：:！!*_“”\"'（）()]", "", text).lower()


_TEXT_CUE = re.compile(
    r"答案\s*(?:应该|应当|应|就|最终)?\s*(?:是|为|选)?\s*[:：]?|【答案】|正确的?(?:选项|答案)\s*(?:是|为)?\s*[:：]?"
    r"|(?:故|应该?|应当|所以|因此)选(?:择|用)?"
    # A diagnosis or conclusion heading: "最可能的诊断：急性胰腺炎", "初步诊断为…", "结论：…".
    r"|(?P<heading>(?:最可能的|最终|初步|临床)?(?<!鉴别)诊断\s*(?:是|为)?\s*[:：]|(?:最终)?结论\s*[:：]"
    r"|(?i:(?<!differential )diagnosis\s*(?:is\b|:)))"
    r"|(?i:\banswers?\s*(?:is|are|:)|correct\s+(?:option|choice)s?\s*(?:is|are|:))",
)


def _option_text(text: str, options: dict[str, str]) -> tuple[str, bool, int] | None:
    """(letters, hedged, position) of the last statement that states option texts, or a line that is one."""
    found: tuple[str, bool, int] | None = None
    candidates = [
        # After a diagnosis heading only its first clause is the diagnosis ("诊断：X，需与Y鉴别" names X alone).
        (m.start(), re.split(r"[，,；;]", clause, maxsplit=1)[0] if m.group("heading") else clause)
        for m in _TEXT_CUE.finditer(text)
        if _counts(text, m.start(), m.end(), m.end())
        for clause in [_sentence_after(text, m.end())]
    ]
    # A line that is one option's text ("MRI"); lines naming different options are a list ("CT\nMRI").
    lines, offset = [], 0
    text_lines = text.split("\n")
    for line, walking in zip(text_lines, _in_options_walk(text_lines)):
        named = {k for k, t in options.items() if _norm(t) and _norm(line) == _norm(t)}
        if named and not walking:  # under "选项分析：" a line "发热" is the option analysed next
            lines.append((offset, line, named.pop()))
        offset += len(line) + 1
    if len({letter for _, _, letter in lines}) == 1:
        candidates += [(start, line) for start, line, _ in lines]
    for start, clause in sorted(candidates):
        hits = _texts_in(clause, options)
        if hits:
            hedged = bool(re.search(r"或|还是|\bor\b|/", clause, re.IGNORECASE)) and len(hits) > 1
            found = ("".join(sorted(hits)), hedged, start)
    if found is None:
        # No cue, but a sentence concludes with one option's text after a verb ("常出现的热型是不规则热。",
        # "应首先考虑急性胰腺炎。"); not a text listed ("包括影像学检查和穿刺检查") or denied ("不是原发病").
        for letter, option in options.items():
            if len(option) < 2:
                continue
            pattern = (
                rf"(?:是|为|考虑|见于|于|即|导致|引起|属于|首选|\bis\b|\bare\b)\s*{re.escape(option)}\s*(?:[。.!！]|$)"
                # "考虑急性胰腺炎可能性最大": the text weighed as the most likely one
                rf"|考虑\s*{re.escape(option)}\s*(?:的)?可能(?:性)?(?:最大|较大|大)"
            )
            for m in re.finditer(pattern, text, re.MULTILINE | re.IGNORECASE):
                if _hypothetical(text, m.start()) or _MENTION_NEGATED.search(_clause_before(text, m.start())):
                    continue
                if found is None or m.start() > found[2]:
                    found = (letter, False, m.start())
    return found


def _texts_in(clause: str, options: dict[str, str]) -> set[str]:
    """Letters of the options whose text the clause states (the longest text wins where texts nest)."""
    norm = _norm(clause)
    spans: list[tuple[int, int, str]] = []
    for letter, option in options.items():
        needle = _norm(option)
        # One character, or "none of the above": only the whole statement is that option.
        short = len(needle) < 2 or option in ("以上均非", "以上都不是", "以上都是", "以上均是")
        if short and needle != norm or not needle:
            continue
        at = norm.find(needle)
        if at >= 0:
            spans.append((at, at + len(needle), letter))
    kept = {
        letter for a, b, letter in spans if not any(a2 <= a and b <= b2 and (b2 - a2) > (b - a) for a2, b2, _ in spans)
    }
    return kept


# --- Public API ----------------------------------------------------------------------------------


def final_answer_text(output: str) -> str:
    """The part of a model output that states the answer: after the last </think> if any."""
    _, sep, tail = output.rpartition(THINK_END)
    return tail if sep else output


def _is_truncated(output: str) -> bool:
    if output.rfind(THINK_START) > output.rfind(THINK_END):
        return True
    tail = final_answer_text(output)
    return bool(_THINKING_HEADING.search(tail)) and not _FINAL_HEADING.search(tail)


def _answer_part(output: str) -> str:
    tail = final_answer_text(output)
    final = list(_FINAL_HEADING.finditer(tail))
    return tail[final[-1].end() :] if final else tail


def _read(output: str, options: Mapping[str, str] | Iterable[str]) -> tuple[str, str, str]:
    """(predicted, status, rule) of one output."""
    texts = dict(options) if isinstance(options, Mapping) else {letter: "" for letter in options}
    texts = {str(k).upper(): unicodedata.normalize("NFKC", str(v)).strip() for k, v in texts.items()}
    if _is_truncated(output):
        return "", TRUNCATED, "truncated"
    text = unicodedata.normalize("NFKC", _answer_part(output)).replace("**", "").replace("`", "")
    statements = _statements(text, texts) or _bare_lines(text, texts)
    if statements:
        last = statements[-1]
        letters, hedged, rule = last.letters.letters, last.letters.hedged, last.rule
    else:
        by_text = _option_text(text, texts)
        if by_text is None:
            return "", EMPTY, "empty"
        letters, hedged, _ = by_text
        rule = "option-text"
    if hedged:
        return "", AMBIGUOUS, "hedge"
    if not set(letters) <= texts.keys():
        return "", INVALID, "invalid"
    return "".join(sorted(set(letters))), ANSWERED, rule


def extract_answer_letters(output: str, options: Mapping[str, str] | Iterable[str]) -> str:
    """Letters the output states as its answer, sorted; "" unless the answer is clear and valid."""
    return _read(output, options)[0]


def grade_answer(output: str, gold: str, options: Mapping[str, str] | Iterable[str]) -> Grade:
    """Grade one free-text output against the gold letter set (e.g. "AC").

    `options` is the question's letter -> text mapping (option texts are then read too, as CMExam's
    own evaluation does) or just its letters.
    """
    predicted, status, rule = _read(output, options)
    correct = status == ANSWERED and set(predicted) == set(gold)
    return Grade(predicted=predicted, correct=correct, status=status, rule=rule)
