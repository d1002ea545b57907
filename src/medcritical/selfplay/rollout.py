"""Self-play rollout: the current model answers each training question k times; every answer is graded.

The student sees exactly the evaluation prompt (`prompts.mcq_messages`), and `grade_answer` is the
project's one grader, so a rollout's pass@1 is comparable with the evaluation's MCQ accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from medcritical.data.cmexam import Question
from medcritical.grader import grade_answer
from medcritical.io.jsonl import append_jsonl
from medcritical.modeling.generation import Generator
from medcritical.prompts import mcq_messages
from medcritical.selfplay.config import RolloutSection
from medcritical.selfplay.cost import prompt_token_counter, timed
from medcritical.selfplay.records import resume_groups

log = logging.getLogger(__name__)


def rollout_questions(
    generator: Generator,
    questions: Sequence[Question],
    config: RolloutSection,
    output_path: str | Path,
    *,
    seed: int = 0,
    timings: str | Path | None = None,
) -> list[dict]:
    """k graded samples per question, appended to `output_path` (JSONL) one chunk of questions at a
    time; questions already there with all k samples are skipped. Returns every record, in question order.

    A record: question_id, sample (0..k-1), trajectory, predicted (letters), gold, correct, num_tokens,
    prompt_tokens (the prompt's length; the k samples share one request). With `timings`, each chunk's
    seconds are appended there (see selfplay.cost).
    """
    count = prompt_token_counter(generator)
    k = config.samples_per_question
    done = resume_groups(
        output_path, key=lambda r: r["question_id"], complete=lambda g: len({r["sample"] for r in g}) == k
    )
    todo = [(i, q) for i, q in enumerate(questions) if q.id not in done]
    if done:
        log.info("rollout: %d questions already done, %d to go", len(questions) - len(todo), len(todo))
    for start in range(0, len(todo), config.chunk_size):
        chunk = todo[start : start + config.chunk_size]
        prompts = [mcq_messages(q, config.language) for _, q in chunk]
        with timed(timings, "rollout") if timings else nullcontext():
            completions = generator.generate(
                prompts,
                n=k,
                temperature=config.temperature,
                top_p=config.top_p,
                max_new_tokens=config.max_new_tokens,
                seed=seed,
                keys=[q.id for _, q in chunk],  # a sample's seed: (seed, question, sample index), never its batch
                desc=f"rollout {start + len(chunk)}/{len(todo)}",
            )
        records = []
        for (_, question), prompt, samples in zip(chunk, prompts, completions):
            prompt_tokens = count(prompt) if count else 0
            for sample, completion in enumerate(samples):
                grade = grade_answer(completion.text, question.answer, question.options)
                records.append(
                    {
                        "question_id": question.id,
                        "sample": sample,
                        "trajectory": completion.text,
                        "predicted": grade.predicted,
                        "gold": question.answer,
                        "correct": grade.correct,
                        "num_tokens": completion.num_tokens,
                        "prompt_tokens": prompt_tokens,
                    }
                )
                done.setdefault(question.id, []).append(records[-1])
        append_jsonl(records, output_path)
    return [r for q in questions for r in sorted(done[q.id], key=lambda r: r["sample"])]


def rollout_statistics(records: Sequence[dict], max_new_tokens: int | None = None) -> dict:
    """pass@1 (share of correct samples), pass@k (share of questions with a correct sample), and the
    shares of questions that are all wrong (pairs need corrections) or all right (nothing to learn)."""
    by_question: dict[str, list[bool]] = {}
    for r in records:
        by_question.setdefault(r["question_id"], []).append(r["correct"])
    questions = len(by_question) or 1
    samples = len(records) or 1
    stats = {
        "questions": len(by_question),
        "samples": len(records),
        "pass@1": sum(r["correct"] for r in records) / samples,
        "pass@k": sum(any(c) for c in by_question.values()) / questions,
        "all_wrong": sum(not any(c) for c in by_question.values()) / questions,
        "all_right": sum(all(c) for c in by_question.values()) / questions,
        "no_answer": sum(not r["predicted"] for r in records) / samples,
        "mean_tokens": sum(r["num_tokens"] for r in records) / samples,
    }
    if max_new_tokens:
        # Samples that hit the token limit were probably cut off before their answer.
        stats["hit_token_limit"] = sum(r["num_tokens"] >= max_new_tokens for r in records) / samples
    return stats
