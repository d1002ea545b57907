"""Deterministic train/eval splits and the leakage check between them.

A question's side of the split depends only on (seed, id), never on file order or Python's hash
seed, so the same recipe gives the same split on every machine and every rerun.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Sequence

from medcritical.data.cmexam import Question


def normalize_text(text: str) -> str:
    """Text identity for leakage checks: NFKC, lowercase, no whitespace or punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[\W_]+", "", text)


def _rank(seed: int, question_id: str) -> str:
    return hashlib.sha256(f"{seed}:{question_id}".encode()).hexdigest()


def split_questions(
    questions: Sequence[Question], eval_size: int, seed: int
) -> tuple[list[Question], list[Question]]:
    """Split into (train, eval) with `eval_size` questions in eval, chosen by a seeded hash of the id."""
    if not 0 <= eval_size <= len(questions):
        raise ValueError(f"eval_size {eval_size} is outside 0..{len(questions)} (the questions loaded)")
    ranked = sorted(questions, key=lambda q: _rank(seed, q.id))
    eval_ids = {q.id for q in ranked[:eval_size]}
    train = [q for q in questions if q.id not in eval_ids]
    evaluation = [q for q in questions if q.id in eval_ids]
    return train, evaluation


def take(questions: Sequence[Question], limit: int | None, seed: int) -> list[Question]:
    """A deterministic subset of `limit` questions (all when limit is None), in file order."""
    if limit is None or limit >= len(questions):
        return list(questions)
    keep = {q.id for q in sorted(questions, key=lambda q: _rank(seed, q.id))[:limit]}
    return [q for q in questions if q.id in keep]


def overlapping(train: Sequence[Question], evaluation: Sequence[Question]) -> list[Question]:
    """Training questions whose normalized text (question + options) also appears in `evaluation`."""

    def key(q: Question) -> str:
        return normalize_text(q.question + "".join(q.options.values()))

    eval_keys = {key(q) for q in evaluation}
    return [q for q in train if key(q) in eval_keys]
