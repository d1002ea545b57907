"""Format diagnostics: how often a model fails to state an answer at all, and what it answers.

An accuracy near chance can mean "knows nothing" or "never finishes its reasoning" or "always
answers C"; these numbers tell them apart. Computed for every evaluation (report.json / report.md)
and every rollout (rollout_stats.json), from the grader's status of each output:

- ``answered``  a valid answer was stated (right or wrong)
- ``empty``     no answer statement
- ``truncated`` cut off: an unclosed ``<think>``, or no answer and the output hit the token limit
- ``ambiguous`` a hedge between options ("A or B")
- ``invalid``   letters that are not options of the question

The shares are exclusive and sum to 1. ``hit_token_limit`` is counted apart, whatever the status:
an output can state an answer and still run to the limit. ``best_constant`` is the accuracy of
always giving the most frequent gold answer: the floor a model must beat to show it read anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from medcritical.core.values import percent
from medcritical.grader import AMBIGUOUS, ANSWERED, EMPTY, INVALID, TRUNCATED, grade_answer

STATUSES = (ANSWERED, EMPTY, TRUNCATED, AMBIGUOUS, INVALID)
NO_ANSWER = "(none)"


def hit_token_limit(num_tokens: int | None, max_new_tokens: int | None) -> bool:
    """A generation that used every allowed token stopped without its end-of-sequence token
    (`num_tokens` counts the EOS when the model stopped by itself)."""
    return bool(max_new_tokens and num_tokens is not None and num_tokens >= max_new_tokens)


def row_status(status: str, predicted: str, hit_limit: bool) -> str:
    """The grader's status, with "no answer because the tokens ran out" counted as truncated."""
    return TRUNCATED if hit_limit and not predicted and status == EMPTY else status


def format_diagnostics(rows: Iterable[Mapping]) -> dict:
    """Diagnostics over graded rows with ``status``, ``predicted``, ``gold`` and ``hit_token_limit``."""
    rows = list(rows)
    n = len(rows)
    statuses = Counter(row["status"] for row in rows)
    predicted = Counter(row["predicted"] or NO_ANSWER for row in rows)
    gold = Counter(row["gold"] for row in rows)
    constant, constant_hits = gold.most_common(1)[0] if gold else ("", 0)
    share = (lambda count: count / n) if n else (lambda count: 0.0)
    return {
        "n": n,
        "shares": {status: share(statuses.get(status, 0)) for status in STATUSES},
        "counts": {status: statuses.get(status, 0) for status in STATUSES},
        "hit_token_limit": share(sum(bool(row.get("hit_token_limit")) for row in rows)),
        "predicted": dict(predicted.most_common()),
        "gold": dict(gold.most_common()),
        "best_constant": {"answer": constant, "accuracy": share(constant_hits)},
    }


def diagnose_rollouts(records: Sequence[Mapping], questions_by_id: Mapping, max_new_tokens: int | None) -> dict:
    """`format_diagnostics` of rollout records (question_id, trajectory, num_tokens): each trajectory
    is graded again for its status (cheap), so the rollout records need no new field."""
    rows = []
    for record in records:
        question = questions_by_id[record["question_id"]]
        grade = grade_answer(record["trajectory"], question.answer, question.options)
        limit = hit_token_limit(record.get("num_tokens"), max_new_tokens)
        rows.append(
            {
                "status": row_status(grade.status, grade.predicted, limit),
                "predicted": grade.predicted,
                "gold": question.answer,
                "hit_token_limit": limit,
            }
        )
    return format_diagnostics(rows)


def diagnostics_line(diagnostics: Mapping, top: int = 4) -> str:
    """One Markdown-friendly line: the failure shares, the answers given and the constant floor."""
    shares = diagnostics["shares"]
    failures = ", ".join(f"{status} {percent(shares[status])}%" for status in STATUSES[1:])
    predicted = ", ".join(f"{k} {v}" for k, v in list(diagnostics["predicted"].items())[:top])
    gold = ", ".join(f"{k} {v}" for k, v in list(diagnostics["gold"].items())[:top])
    best = diagnostics["best_constant"]
    return (
        f"{failures}; hit token limit {percent(diagnostics['hit_token_limit'])}%; "
        f"answers given: {predicted} (gold: {gold}); "
        f"constant answer {best['answer'] or '-'} would score {percent(best['accuracy'])}%"
    )
