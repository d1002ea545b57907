"""Self-correction: the model sees a question and its own wrong attempt, finds the error, answers again.

Each wrong trajectory gets up to M attempts (only still-wrong ones are retried). Every attempt is
graded by `grade_answer`; a correction counts as verified only when it reaches the gold answer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from medcritical.data.cmexam import Question
from medcritical.grader import grade_answer
from medcritical.io.jsonl import append_jsonl
from medcritical.modeling.generation import Generator, Messages
from medcritical.prompts import format_options, load_prompt
from medcritical.selfplay.config import CorrectionSection
from medcritical.selfplay.records import resume_groups

log = logging.getLogger(__name__)


def correction_messages(question: Question, attempt: str, language: str = "zh") -> Messages:
    """One user turn quoting the wrong attempt (not a multi-turn chat: some chat templates drop the
    <think> part of earlier assistant turns, and the model must see its whole reasoning)."""
    text = load_prompt("correction", language).format(
        question=question.question, options=format_options(question.options), attempt=attempt
    )
    return [{"role": "user", "content": text}]


def _key(record: dict) -> tuple[str, int]:
    return record["question_id"], record["sample"]


def correct_trajectories(
    generator: Generator,
    questions: Mapping[str, Question],
    wrong: Sequence[dict],
    config: CorrectionSection,
    output_path: str | Path,
    *,
    top_p: float = 0.95,
    max_new_tokens: int = 1024,
    chunk_size: int = 256,
    seed: int = 0,
) -> list[dict]:
    """Try to correct each wrong rollout record; append one record per wrong trajectory to `output_path`.

    A record: question_id, sample, attempts ([{text, predicted, correct, num_tokens}], at most M,
    stopping at the first correct one), corrected (bool), correction (the verified text or None).
    Trajectories already in the file are skipped. Returns the records in the order of `wrong`.
    """
    done = resume_groups(output_path, key=_key, complete=lambda group: len(group) == 1)
    todo = [r for r in wrong if _key(r) not in done]
    if done:
        log.info("correction: %d trajectories already done, %d to go", len(wrong) - len(todo), len(todo))
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        attempts: list[list[dict]] = [[] for _ in chunk]
        for attempt_number in range(config.attempts):
            # Retry only those not yet corrected.
            pending = [i for i, tried in enumerate(attempts) if not (tried and tried[-1]["correct"])]
            if not pending:
                break
            completions = generator.generate(
                [correction_messages(questions[chunk[i]["question_id"]], chunk[i]["trajectory"], config.language) for i in pending],
                n=1,
                temperature=config.temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                seed=seed,
                keys=[f"{chunk[i]['question_id']}#{chunk[i]['sample']}#correction{attempt_number + 1}" for i in pending],
                desc=f"correction attempt {attempt_number + 1}/{config.attempts}",
            )
            for i, (completion,) in zip(pending, completions):
                question = questions[chunk[i]["question_id"]]
                grade = grade_answer(completion.text, question.answer, question.options)
                attempts[i].append(
                    {
                        "text": completion.text,
                        "predicted": grade.predicted,
                        "correct": grade.correct,
                        "num_tokens": completion.num_tokens,
                    }
                )
        records = []
        for rollout, tried in zip(chunk, attempts):
            verified = next((a for a in tried if a["correct"]), None)
            records.append(
                {
                    "question_id": rollout["question_id"],
                    "sample": rollout["sample"],
                    "attempts": tried,
                    "corrected": verified is not None,
                    "correction": verified["text"] if verified else None,
                    "correction_tokens": verified["num_tokens"] if verified else None,
                }
            )
            done[_key(rollout)] = [records[-1]]
        append_jsonl(records, output_path)
    return [done[_key(r)][0] for r in wrong]


def correction_statistics(records: Sequence[dict], attempts: int) -> dict:
    wrong = len(records)
    corrected = sum(r["corrected"] for r in records)
    by_attempt = [0] * attempts
    for r in records:
        if r["corrected"]:
            by_attempt[len(r["attempts"]) - 1] += 1
    return {
        "wrong_trajectories": wrong,
        "corrected": corrected,
        "correction_rate": corrected / wrong if wrong else 0.0,
        "corrected_at_attempt": by_attempt,  # index 0: first attempt
        "generations": sum(len(r["attempts"]) for r in records),
    }
