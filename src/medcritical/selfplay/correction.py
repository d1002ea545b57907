"""Correction of wrong trajectories, verified beyond luck, ending in a standalone chosen answer.

For each wrong rollout trajectory, up to M attempts (`selfplay.correction.attempts`), each:
1. votes: the corrector — the student itself (`selfplay.corrector: self`) or the distillation teacher
   (`teacher`) — reads the question and the wrong trajectory and writes `votes` corrections;
2. stability: the attempt goes on only when at least `needed_votes` of them reach the gold letters
   (one lucky letter is not a correction);
3. rewrite: the student rewrites the first gold-reaching correction as a fresh answer to the original
   question (`standalone.rewrite_messages`); the rewrite must reach gold again, be in the trained
   format and never refer back to an earlier attempt. It becomes the pair's chosen text.
Every step is graded by the one grader, `grade_answer`. Attempts stop at the first accepted one.
What luck alone explains of the accepted ones: `selfplay.chance`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from medcritical.data.cmexam import Question
from medcritical.distill.teachers import TeacherRequest
from medcritical.errors import StepError
from medcritical.grader import grade_answer
from medcritical.io.jsonl import append_jsonl
from medcritical.modeling.generation import Generator, Messages
from medcritical.prompts import format_options, load_prompt
from medcritical.selfplay.chance import guess_probability, guessing_acceptance, placebo_acceptance
from medcritical.selfplay.config import CorrectionSection
from medcritical.selfplay.cost import prompt_token_counter, timed
from medcritical.selfplay.records import resume_groups, trajectory_key
from medcritical.selfplay.standalone import (
    in_trained_format,
    refers_back,
    rewrite_messages,
)

log = logging.getLogger(__name__)


def correction_messages(question: Question, attempt: str, language: str = "zh") -> Messages:
    """One user turn quoting the wrong attempt (not a multi-turn chat: some chat templates drop the
    <think> part of earlier assistant turns, and the model must see its whole reasoning)."""
    text = load_prompt("correction", language).format(
        question=question.question, options=format_options(question.options), attempt=attempt
    )
    return [{"role": "user", "content": text}]


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Corrector(Protocol):
    name: str  # "self" or "teacher": whose tokens a correction costs
    description: dict  # what corrected, for the fingerprint and the statistics

    def correct(
        self,
        prompts: Sequence[Messages],
        questions: Sequence[Question],
        *,
        votes: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        attempt: int,
        keys: Sequence[str] | None = None,
    ) -> list[list[Reply]]:
        """`votes` replies to each correction prompt."""
        ...


class SelfCorrector:
    """The student corrects itself (the paper's method)."""

    name = "self"

    def __init__(self, generator: Generator):
        self.generator, self.count = generator, prompt_token_counter(generator)
        self.description = {"corrector": "self"}

    def correct(self, prompts, questions, *, votes, temperature, top_p, max_new_tokens, seed, attempt, keys=None):
        completions = self.generator.generate(
            prompts,
            n=votes,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            keys=keys,
            desc=f"self-correction attempt {attempt}",
        )
        replies = []
        for prompt, samples in zip(prompts, completions):
            # One request with n samples: its prompt is processed (and counted) once.
            prompt_tokens = self.count(prompt) if self.count else 0
            replies.append([Reply(c.text, prompt_tokens if i == 0 else 0, c.num_tokens) for i, c in enumerate(samples)])
        return replies


class TeacherCorrector:
    """The distillation teacher (`distill` section, any backend) reads the student's wrong trajectory and
    writes the correction: the teacher-guided baseline the paper's self-correction replaces."""

    name = "teacher"

    def __init__(self, teacher, *, max_new_tokens: int | None = None):
        # A reasoning teacher thinks longer than the student: its own token budget (distill.max_new_tokens).
        self.teacher, self.max_new_tokens = teacher, max_new_tokens
        generator = getattr(teacher, "generator", None)
        self.count = prompt_token_counter(generator) if generator is not None else None
        self.description = {"corrector": "teacher", **teacher.description}

    def correct(self, prompts, questions, *, votes, temperature, top_p, max_new_tokens, seed, attempt, keys=None):

        # Every vote of every attempt its own request with its own seed (the trajectory's key, the vote):
        # the self corrector's votes are n samples on separate streams, and the teacher's must be too, or
        # the 2-of-3 stability filter would bite only the self arm.
        keys = keys or [f"{q.id}#{i}#correction{attempt}" for i, q in enumerate(questions)]
        requests = [
            TeacherRequest(question=q, kind="correction", attempt=attempt, messages=p, key=key, vote=vote)
            for p, q, key in zip(prompts, questions, keys)
            for vote in range(votes)
        ]
        index = {id(r): i for i, r in enumerate(requests)}
        replies: list[Reply | None] = [None] * len(requests)

        def on_reply(request, reply) -> None:
            text = reply.content or ""
            if getattr(reply, "reasoning_content", "") and "</think>" not in text:
                # A server with a reasoning parser returns the thinking apart: put it back in the trained format.
                text = f"<think>\n{reply.reasoning_content.strip()}\n</think>\n{text.strip()}"
            prompt_tokens = reply.prompt_tokens or (self.count(request.messages) if self.count else 0)
            replies[index[id(request)]] = Reply(text, prompt_tokens, reply.completion_tokens, reply.error)

        self.teacher.complete(
            requests, max_new_tokens=self.max_new_tokens or max_new_tokens, seed=seed, on_reply=on_reply
        )
        missing = sum(r is None for r in replies)
        if missing:
            raise StepError(f"the teacher returned no reply for {missing} of {len(requests)} correction requests")
        if requests and all(r.error for r in replies):
            # Not "no correction accepted" (a number), but a teacher that does not answer (a failure).
            raise StepError(
                f"the teacher {self.teacher.description} answered none of {len(requests)} correction requests "
                f"(first error: {replies[0].error}); check the distill section's teacher settings or the endpoint"
            )
        return [replies[i * votes : (i + 1) * votes] for i in range(len(prompts))]


def _graded(reply: Reply, question: Question) -> dict:
    grade = grade_answer(reply.text, question.answer, question.options)
    vote = {
        "text": reply.text,
        "predicted": grade.predicted,
        "correct": grade.correct,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
    }
    if reply.error:
        vote["error"] = reply.error
    return vote


def _attempt(question: Question, votes: Sequence[Reply], need: int) -> dict:
    """An attempt from its graded votes: stable when at least `need` of them reach gold; its rewrite comes later."""
    graded = [_graded(v, question) for v in votes]
    gold_votes = sum(v["correct"] for v in graded)
    return {
        "votes": graded,
        "gold_votes": gold_votes,
        "stable": gold_votes >= need,
        "rewrite": None,
        "accepted": False,
        "reason": None if gold_votes >= need else "unstable",
    }


def _rewrite_stable(
    generator,
    count_student,
    config: CorrectionSection,
    asked: list[Question],
    attempts: list[dict],
    keys: list[str],
    *,
    desc: str,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    timings,
) -> None:
    """The student turns each stable attempt's first gold-reaching correction into a fresh answer to the question
    alone; the attempt is accepted when that rewrite reaches gold, stands alone and is in the trained format."""
    analyses = [next(v["text"] for v in attempt["votes"] if v["correct"]) for attempt in attempts]
    prompts = [rewrite_messages(question, a, config.language) for question, a in zip(asked, analyses)]
    with timed(timings, "rewrite") if timings else nullcontext():
        rewrites = generator.generate(
            prompts,
            n=1,
            temperature=config.rewrite_temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            keys=keys,
            desc=desc,
        )
    for question, attempt, prompt, (completion,) in zip(asked, attempts, prompts, rewrites):
        rewrite = _graded(
            Reply(completion.text, count_student(prompt) if count_student else 0, completion.num_tokens), question
        )
        rewrite["refers_back"] = refers_back(completion.text)
        rewrite["in_format"] = in_trained_format(completion.text)
        attempt["rewrite"] = rewrite
        attempt["reason"] = (
            "rewrite_wrong"
            if not rewrite["correct"]
            else "rewrite_refers_back"
            if rewrite["refers_back"]
            else "rewrite_format"
            if not rewrite["in_format"]
            else None
        )
        attempt["accepted"] = attempt["reason"] is None


def _record(rollout: dict, tried: list[dict], corrector: str) -> dict:
    """One wrong trajectory's record: its attempts and, when one was accepted, its correction and chosen text."""
    accepted = next((a for a in tried if a["accepted"]), None)
    return {
        "question_id": rollout["question_id"],
        "sample": rollout["sample"],
        "corrector": corrector,
        "attempts": tried,
        "corrected": accepted is not None,
        "correction": next(v["text"] for v in accepted["votes"] if v["correct"]) if accepted else None,
        "chosen": accepted["rewrite"]["text"] if accepted else None,
        "chosen_tokens": accepted["rewrite"]["completion_tokens"] if accepted else None,
    }


def correct_trajectories(
    generator: Generator,
    questions: Mapping[str, Question],
    wrong: Sequence[dict],
    config: CorrectionSection,
    output_path: str | Path,
    *,
    corrector: Corrector | None = None,
    top_p: float = 0.95,
    max_new_tokens: int = 1024,
    chunk_size: int = 256,
    seed: int = 0,
    timings: str | Path | None = None,
) -> list[dict]:
    """Correct each wrong rollout record; append one record per wrong trajectory to `output_path`.

    `generator` is the student (it rewrites, and corrects itself unless `corrector` says otherwise).
    A record: question_id, sample, corrector, attempts ([{votes: [{text, predicted, correct, prompt_tokens,
    completion_tokens}], gold_votes, stable, rewrite: {...same, refers_back, in_format} or None, accepted,
    reason}], at most M), corrected (bool), correction (the accepted corrector text), chosen (the accepted
    rewrite: the pair's chosen text) and chosen_tokens. Trajectories already in the file are skipped.
    Returns the records in the order of `wrong`.
    """
    corrector = corrector or SelfCorrector(generator)
    count_student = prompt_token_counter(generator)
    done = resume_groups(output_path, key=trajectory_key, complete=lambda group: len(group) == 1)
    todo = [r for r in wrong if trajectory_key(r) not in done]
    if done:
        log.info("correction: %d trajectories already done, %d to go", len(wrong) - len(todo), len(todo))
    need = config.needed_votes
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        asked = [questions[r["question_id"]] for r in chunk]
        attempts: list[list[dict]] = [[] for _ in chunk]
        for attempt_number in range(1, config.attempts + 1):
            pending = [i for i, tried in enumerate(attempts) if not (tried and tried[-1]["accepted"])]
            if not pending:
                break
            with timed(timings, "correction") if timings else nullcontext():
                replies = corrector.correct(
                    [correction_messages(asked[i], chunk[i]["trajectory"], config.language) for i in pending],
                    [asked[i] for i in pending],
                    votes=config.votes,
                    temperature=config.temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    # A vote's seed: (run seed, trajectory, attempt, vote), never its place in a batch.
                    seed=seed,
                    attempt=attempt_number,
                    keys=[
                        f"{chunk[i]['question_id']}#{chunk[i]['sample']}#correction{attempt_number}" for i in pending
                    ],
                )
            for i, votes in zip(pending, replies):
                attempts[i].append(_attempt(asked[i], votes, need))
            stable = [i for i in pending if attempts[i][-1]["stable"]]
            if stable:
                _rewrite_stable(
                    generator,
                    count_student,
                    config,
                    [asked[i] for i in stable],
                    [attempts[i][-1] for i in stable],
                    [f"{chunk[i]['question_id']}#{chunk[i]['sample']}#rewrite{attempt_number}" for i in stable],
                    desc=f"rewrite attempt {attempt_number}",
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    seed=seed,
                    timings=timings,
                )
        records = [_record(rollout, tried, corrector.name) for rollout, tried in zip(chunk, attempts)]
        for rollout, record in zip(chunk, records):
            done[trajectory_key(rollout)] = [record]
        append_jsonl(records, output_path)
    return [done[trajectory_key(r)][0] for r in wrong]


def correction_statistics(
    records: Sequence[dict],
    config: CorrectionSection,
    questions: Mapping[str, Question] | None = None,
    rejected: Mapping | None = None,
) -> dict:
    wrong = len(records)
    corrected = sum(r["corrected"] for r in records)
    by_attempt = [0] * config.attempts
    reasons: dict[str, int] = {"unstable": 0, "rewrite_wrong": 0, "rewrite_refers_back": 0, "rewrite_format": 0}
    for r in records:
        if r["corrected"]:
            by_attempt[len(r["attempts"]) - 1] += 1
        for a in r["attempts"]:
            if a["reason"]:
                reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
    attempts = [a for r in records for a in r["attempts"]]
    votes = [v for a in attempts for v in a["votes"]]
    stats = {
        "wrong_trajectories": wrong,
        "corrected": corrected,
        "correction_rate": corrected / wrong if wrong else 0.0,
        "corrected_at_attempt": by_attempt,  # index 0: first attempt
        "generations": len(votes) + sum(a["rewrite"] is not None for a in attempts),
        "votes": len(votes),
        "gold_votes": sum(v["correct"] for v in votes),
        "stable_attempts": sum(a["stable"] for a in attempts),
        "rewrites": sum(a["rewrite"] is not None for a in attempts),
        "rejected_attempts": reasons,
        "corrector_errors": sum("error" in v for v in votes),
    }
    if questions is not None and config.attempts:
        # What a model that only guessed letters would have got accepted under the same rules: the part
        # of `corrected` that luck alone explains.
        expected = sum(guessing_acceptance(guess_probability(questions[r["question_id"]]), config) for r in records)
        # A lower bound: it assumes independent uniform guesses (see `placebo_acceptance` for the measured figure).
        stats["expected_by_guessing"] = expected
        stats["guessing_share"] = expected / corrected if corrected else None
        if rejected is not None:
            placebo = placebo_acceptance(records, config, questions, rejected)
            stats["placebo"] = placebo
            # What chance explains, from the analytic lower bound to the placebo measured on these trajectories.
            stats["chance_range"] = [min(expected, placebo["expected"]), max(expected, placebo["expected"])]
    return stats
