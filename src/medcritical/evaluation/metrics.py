"""Accuracy with its uncertainty, overall and by category. Every summary carries its protocol."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

from medcritical.data.cmexam import Question

Z_95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _cell(correct: int, n: int) -> dict:
    low, high = wilson_interval(correct, n)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95": [round(low, 4), round(high, 4)],
    }


def summarize(protocol: str, questions: Iterable[Question], correct_by_id: Mapping[str, bool]) -> dict:
    """Accuracy overall, single vs multi-answer and by each annotation column.

    A question with no entry in `correct_by_id` counts as wrong: a missing answer is not a skip.
    """
    questions = list(questions)
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    total = [0, 0]
    for q in questions:
        ok = int(bool(correct_by_id.get(q.id, False)))
        total[0] += ok
        total[1] += 1
        keys = [("answer_type", "multi" if q.is_multi_answer else "single")]
        keys += list(q.annotations.items())
        for column, value in keys:
            groups[column][value or "(empty)"][0] += ok
            groups[column][value or "(empty)"][1] += 1
    return {
        "protocol": protocol,
        **_cell(*total),
        "by": {
            column: {value: _cell(*counts) for value, counts in sorted(values.items())}
            for column, values in groups.items()
        },
    }
