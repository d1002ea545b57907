"""Chosen answers that stand alone: a fresh answer to the original question, never a retraction.

A pair's prompt is the original mcq question, so its chosen text must read as a first answer to it.
A correction does not: it opens by pointing at "the error in the earlier answer". So the stable
correction is handed to the student as a reference analysis (`rewrite.<lang>.txt`) and the student
writes a clean answer in its trained format; that rewrite is graded again and checked here for any
word that refers back to an attempt the prompt does not contain.
"""

from __future__ import annotations

import re
from functools import cache

from medcritical.data.cmexam import Question
from medcritical.grader import THINK_END
from medcritical.modeling.generation import Messages
from medcritical.prompts import format_options, load_prompt

# Words that only make sense after an earlier attempt, in both prompt languages.
BACK_REFERENCE_MARKERS = (
    "之前的回答",
    "之前的解答",
    "之前的答案",
    "之前的推理",
    "之前的作答",
    "上一次",
    "上次的",
    "原答案",
    "原来的答案",
    "错误在于",
    "先前的",
    "此前的",
    "重新解答",
    "重新作答",
    "重新审视",
    "参考分析",
    "我之前",
    "你之前",
    "我错了",
    "previous answer",
    "previous attempt",
    "earlier answer",
    "earlier attempt",
    "earlier reasoning",
    "my mistake",
    "i was wrong",
    "the error in",
    "my previous",
    "your previous",
    "re-examine",
    "reference analysis",
    "original answer",
)
_PROMPT_FRAGMENT = re.compile(r"[^，。、；：！？,.;:!?()（）“”\"'\n]+")


@cache
def prompt_fragments(name: str) -> tuple[str, ...]:
    """Distinctive phrases of a prompt file (both languages): a chosen text that repeats one copied the
    prompt's wording (e.g. "找出之前推理中的错误") into an answer where it means nothing."""
    fragments = []
    for language in ("zh", "en"):
        text = re.sub(r"\{\w+\}", "\n", load_prompt(name, language).text)
        # The wording it shares with the question prompt itself (exam name, answer format) is no reference back.
        question_prompt = load_prompt("mcq", language).text.lower()
        for piece in _PROMPT_FRAGMENT.findall(text):
            piece = piece.strip().lower()
            long_enough = len(piece.split()) >= 4 if piece.isascii() else len(piece) >= 6
            if long_enough and "<think>" not in piece and piece not in question_prompt:
                fragments.append(piece)
    return tuple(fragments)


def refers_back(text: str) -> str | None:
    """The first marker or correction/rewrite prompt phrase found in `text`, or None when it stands alone."""
    lowered = text.lower()
    for marker in (*BACK_REFERENCE_MARKERS, *prompt_fragments("correction"), *prompt_fragments("rewrite")):
        if marker.lower() in lowered:
            return marker
    return None


def in_trained_format(text: str) -> bool:
    """Reasoning closed by </think>, then the answer: what the student is trained and asked to write."""
    return THINK_END in text and bool(text.rpartition(THINK_END)[2].strip())


def rewrite_messages(question: Question, analysis: str, language: str = "zh") -> Messages:
    text = load_prompt("rewrite", language).format(
        question=question.question, options=format_options(question.options), analysis=analysis.strip()
    )
    return [{"role": "user", "content": text}]
