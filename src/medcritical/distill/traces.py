"""What the teacher is asked, and how its replies become checked SFT answers.

Two requests per question, as in the paper: a *thought template* (a reusable high-level approach to
this kind of question), then a *trace* (step-by-step reasoning in <think>...</think> that follows the
template, then "答案：X"). The SFT answer (``sft_trace.<lang>.txt``) opens the <think> block with the
template and continues with the teacher's reasoning: the student learns to recall an approach
before reasoning, and at inference, shown only the MCQ prompt, writes its own template first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medcritical.data.cmexam import Question
from medcritical.grader import THINK_END, extract_answer_letters, grade_answer
from medcritical.modeling.llm_client import ChatReply
from medcritical.prompts import Prompt, format_options, load_prompt

THINK_START = "<think>"
# Chat-template control tokens some servers leak into the text (<|im_end|>, <|endoftext|>): inside SFT
# data they would be encoded as the real tokens and teach the student to stop mid-thought.
_CONTROL_TOKEN = re.compile(r"<\|[^|<>]{1,40}\|>")
TEMPLATE, TRACE = "template", "trace"  # the two request kinds


@dataclass(frozen=True)
class DistillPrompts:
    template: Prompt  # asks for the thought template
    trace: Prompt  # asks for the reasoning, given the template
    gold_hint: Prompt  # appended to the trace prompt when distill.show_gold_answer is on
    sft_trace: Prompt  # the assistant answer the student is trained on
    explanation_template: Prompt  # the template of the explanations backend

    @classmethod
    def load(cls, language: str) -> DistillPrompts:
        return cls(*(load_prompt(name, language) for name in cls.__dataclass_fields__))

    @property
    def versions(self) -> dict[str, str]:
        return {name: getattr(self, name).version for name in self.__dataclass_fields__}


def template_messages(prompts: DistillPrompts, question: Question) -> list[dict[str, str]]:
    text = prompts.template.format(question=question.question, options=format_options(question.options))
    return [{"role": "user", "content": text}]


def trace_messages(
    prompts: DistillPrompts, question: Question, template: str, show_gold_answer: bool
) -> list[dict[str, str]]:
    hint = prompts.gold_hint.format(answer=question.answer) if show_gold_answer else ""
    text = prompts.trace.format(
        template=template, question=question.question, options=format_options(question.options), gold_hint=hint
    )
    return [{"role": "user", "content": text.strip()}]


def _clean(text: str) -> str:
    return _CONTROL_TOKEN.sub("", text.replace(THINK_START, "").replace(THINK_END, "")).strip()


def split_reasoning(content: str, reasoning_content: str = "") -> tuple[str, str]:
    """(reasoning, final text) of a reply.

    The reasoning is the <think> block of the content; reasoning models served with a chat template
    that opens <think> itself return only the closing tag, and servers with a reasoning parser
    return it separately as reasoning_content.
    """
    head, sep, tail = content.rpartition(THINK_END)
    if sep:
        return _clean(head.split(THINK_START, 1)[-1]), _clean(tail)
    return _clean(reasoning_content), _clean(content)


def _truncated(reply: ChatReply) -> str:
    return " (stopped at the token limit: raise distill.max_new_tokens)" if reply.finish_reason == "length" else ""


def parse_template(reply: ChatReply, options: dict[str, str]) -> tuple[str | None, str | None]:
    """(template, None), or (None, why the reply is unusable)."""
    if not reply.ok:
        return None, f"teacher failed: {reply.error}"
    _, template = split_reasoning(reply.content, reply.reasoning_content)
    if not template:
        return None, "empty template" + _truncated(reply)
    if extract_answer_letters(template, options):
        # A general approach that ends in "答案：C" would hand the answer to the trace (and teach the
        # student to answer before reasoning).
        return None, "template states an answer (it should be a general approach)"
    return template, None


@dataclass(frozen=True)
class TraceCheck:
    reasoning: str
    final: str  # the text after </think>
    predicted: str  # letters the grader reads in `final`
    correct: bool
    problem: str | None  # why the reply is malformed; None when it is a well-formed trace


def check_trace(reply: ChatReply, question: Question) -> TraceCheck:
    """Split a trace reply and grade its final answer with the project's one grader."""
    if not reply.ok:
        return TraceCheck("", "", "", False, f"teacher failed: {reply.error}")
    reasoning, final = split_reasoning(reply.content, reply.reasoning_content)
    grade = grade_answer(final, question.answer, question.options)
    problem = None
    if not reasoning and not final:
        problem = "empty reply" + _truncated(reply)
    elif not reasoning:
        problem = "no reasoning: no <think>...</think> block and no reasoning_content" + _truncated(reply)
    elif not grade.predicted:
        problem = "no answer statement (答案：X) after the reasoning" + _truncated(reply)
    return TraceCheck(reasoning, final, grade.predicted, grade.correct, problem)


def sft_answer(prompts: DistillPrompts, template: str, reasoning: str, letters: str) -> str:
    """The assistant message: "<think>template + reasoning</think>\\n答案：X" (read by the grader)."""
    return prompts.sft_trace.format(template=template, reasoning=reasoning, answer=letters)
