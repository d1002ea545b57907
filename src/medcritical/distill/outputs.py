"""From the progress log to the outputs: the SFT set, the rejected traces and the statistics.

Rows follow the input question order, so the same replies always give byte-identical files.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from medcritical.data.cmexam import ANNOTATION_COLUMNS, Question
from medcritical.distill.progress import QuestionProgress
from medcritical.distill.traces import TEMPLATE, TRACE, DistillPrompts, check_trace, parse_template, sft_answer
from medcritical.prompts import mcq_messages  # the student's prompt at evaluation and rollout


@dataclass(frozen=True)
class Outcome:
    """What one question yielded: its SFT row (None when no trace was accepted) and its rejections."""

    sft_row: dict | None
    rejected: list[dict]
    trace_attempts: int


def accepted_attempt(question: Question, progress: QuestionProgress, verify: bool) -> int | None:
    """The first trace attempt that is well formed and, when verifying, answers the gold letters."""
    for attempt, reply in sorted(progress.traces.items()):
        check = check_trace(reply, question)
        if check.problem is None and (check.correct or not verify):
            return attempt
    return None


def question_outcome(
    question: Question, progress: QuestionProgress, *, prompts: DistillPrompts, verify: bool, source: dict
) -> Outcome:
    rejected = []
    for attempt, reply in sorted(progress.templates.items()):
        _, problem = parse_template(reply, question.options)
        if problem:
            rejected.append(_rejected_row(question, TEMPLATE, attempt, problem, reply, template=None))
    template = progress.template
    chosen = accepted_attempt(question, progress, verify)
    sft_row = None
    for attempt, reply in sorted(progress.traces.items()):
        check = check_trace(reply, question)
        if attempt == chosen:
            answer = sft_answer(prompts, template[1], check.reasoning, check.predicted)
            sft_row = {
                "id": question.id,
                "messages": mcq_messages(question, prompts.trace.language) + [{"role": "assistant", "content": answer}],
                "metadata": {
                    "source": source.get("backend"),  # "explanations" marks traces built from the data
                    "teacher": source.get("model") or source.get("source"),
                    "attempt": attempt,
                    "gold": question.answer,
                    "predicted": check.predicted,
                    "correct": check.correct,
                    "multi_answer": question.is_multi_answer,
                },
            }
        elif check.problem or not check.correct:
            reason = check.problem or f"wrong answer: {check.predicted} (gold {question.answer})"
            rejected.append(_rejected_row(question, TRACE, attempt, reason, reply, template=template[1]))
    return Outcome(sft_row, rejected, len(progress.traces))


def _rejected_row(question: Question, kind: str, attempt: int, reason: str, reply, template: str | None) -> dict:
    return {
        "id": question.id,
        "kind": kind,
        "attempt": attempt,
        "reason": reason,
        "gold": question.answer,
        "template": template,
        "content": reply.content,
        "reasoning_content": reply.reasoning_content,
        "finish_reason": reply.finish_reason,
        "error": reply.error,
    }


def reason_category(reason: str) -> str:
    """ "teacher failed: HTTP 500 ..." -> "teacher failed"; "empty reply (stopped ...)" -> "empty reply"."""
    return reason.split(":")[0].split(" (")[0].strip()


def _group(outcomes: Sequence[tuple[Question, Outcome]]) -> dict:
    accepted = sum(o.sft_row is not None for _, o in outcomes)
    return {
        "questions": len(outcomes),
        "accepted": accepted,
        "acceptance_rate": round(accepted / len(outcomes), 4) if outcomes else None,
        "trace_attempts": sum(o.trace_attempts for _, o in outcomes),
    }


def distill_statistics(
    questions: Sequence[Question],
    outcomes: Sequence[Outcome],
    progress: dict[str, QuestionProgress],
    price_per_million_tokens: float | None,
) -> dict:
    """Counts, acceptance overall / by answer type / by annotation column, rejection reasons, tokens, cost."""
    pairs = list(zip(questions, outcomes))
    replies = [r for p in progress.values() for r in (*p.templates.values(), *p.traces.values())]
    trace_attempts = sum(o.trace_attempts for o in outcomes)
    accepted = sum(o.sft_row is not None for o in outcomes)
    by_annotation: dict[str, dict] = {}
    for column in ANNOTATION_COLUMNS:
        groups: dict[str, list] = defaultdict(list)
        for question, outcome in pairs:
            if question.annotations.get(column):
                groups[question.annotations[column]].append((question, outcome))
        if groups:
            by_annotation[column] = {value: _group(group) for value, group in sorted(groups.items())}
    prompt_tokens = sum(r.prompt_tokens for r in replies)
    completion_tokens = sum(r.completion_tokens for r in replies)
    total_tokens = prompt_tokens + completion_tokens
    return {
        "questions": len(questions),
        "accepted": accepted,
        "acceptance_rate": round(accepted / len(questions), 4) if questions else None,
        "trace_attempts": trace_attempts,
        "trace_acceptance_rate": round(accepted / trace_attempts, 4) if trace_attempts else None,
        "template_requests": sum(len(p.templates) for p in progress.values()),
        "correct_traces": sum(check_trace(r, q).correct for q in questions for r in progress[q.id].traces.values()),
        "rejections": dict(sorted(Counter(reason_category(r["reason"]) for o in outcomes for r in o.rejected).items())),
        "by_type": {
            "single_answer": _group([p for p in pairs if not p[0].is_multi_answer]),
            "multi_answer": _group([p for p in pairs if p[0].is_multi_answer]),
        },
        "by_annotation": by_annotation,
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens, "total": total_tokens},
        "http_requests": sum(r.requests for r in replies),
        "teacher_seconds": round(sum(r.latency_s for r in replies), 2),
        "price_per_million_tokens": price_per_million_tokens,
        "estimated_cost": (
            round(total_tokens / 1e6 * price_per_million_tokens, 4) if price_per_million_tokens is not None else None
        ),
    }
