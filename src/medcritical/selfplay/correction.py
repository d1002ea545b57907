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
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Protocol

from medcritical.data.cmexam import Question
from medcritical.distill.teachers import TeacherRequest
from medcritical.errors import StepError
from medcritical.grader import grade_answer
from medcritical.io.jsonl import append_jsonl
from medcritical.modeling.generation import Generator, Messages
from medcritical.prompts import format_options, load_prompt
from medcritical.selfplay.config import CorrectionSection
from medcritical.selfplay.cost import prompt_token_counter, timed
from medcritical.selfplay.records import resume_groups
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


def _key(record: dict) -> tuple[str, int]:
    return record["question_id"], record["sample"]


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
    done = resume_groups(output_path, key=_key, complete=lambda group: len(group) == 1)
    todo = [r for r in wrong if _key(r) not in done]
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
            stable = []
            for i, votes in zip(pending, replies):
                graded = [_graded(v, asked[i]) for v in votes]
                gold_votes = sum(v["correct"] for v in graded)
                attempt = {
                    "votes": graded,
                    "gold_votes": gold_votes,
                    "stable": gold_votes >= need,
                    "rewrite": None,
                    "accepted": False,
                    "reason": None if gold_votes >= need else "unstable",
                }
                attempts[i].append(attempt)
                if attempt["stable"]:
                    stable.append(i)
            if not stable:
                continue
            # The student turns the first gold-reaching correction into a fresh answer to the question alone.
            analyses = [next(v["text"] for v in attempts[i][-1]["votes"] if v["correct"]) for i in stable]
            rewrite_prompts = [rewrite_messages(asked[i], a, config.language) for i, a in zip(stable, analyses)]
            with timed(timings, "rewrite") if timings else nullcontext():
                rewrites = generator.generate(
                    rewrite_prompts,
                    n=1,
                    temperature=config.rewrite_temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    seed=seed,
                    keys=[f"{chunk[i]['question_id']}#{chunk[i]['sample']}#rewrite{attempt_number}" for i in stable],
                    desc=f"rewrite attempt {attempt_number}",
                )
            for i, prompt, (completion,) in zip(stable, rewrite_prompts, rewrites):
                rewrite = _graded(
                    Reply(completion.text, count_student(prompt) if count_student else 0, completion.num_tokens),
                    asked[i],
                )
                rewrite["refers_back"] = refers_back(completion.text)
                rewrite["in_format"] = in_trained_format(completion.text)
                attempt = attempts[i][-1]
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
        records = []
        for rollout, tried in zip(chunk, attempts):
            accepted = next((a for a in tried if a["accepted"]), None)
            records.append(
                {
                    "question_id": rollout["question_id"],
                    "sample": rollout["sample"],
                    "corrector": corrector.name,
                    "attempts": tried,
                    "corrected": accepted is not None,
                    "correction": next(v["text"] for v in accepted["votes"] if v["correct"]) if accepted else None,
                    "chosen": accepted["rewrite"]["text"] if accepted else None,
                    "chosen_tokens": accepted["rewrite"]["completion_tokens"] if accepted else None,
                }
            )
            done[_key(rollout)] = [records[-1]]
        append_jsonl(records, output_path)
    return [done[_key(r)][0] for r in wrong]


def guess_probability(question: Question) -> float:
    """Chance that a uniformly guessed letter set equals gold: 1/m for a single-answer question with m
    options, 1/(2^m - m - 1) for a multi-answer one (any set of two or more letters)."""
    m = len(question.options)
    return 1 / m if not question.is_multi_answer else 1 / max(2**m - m - 1, 1)


def guessing_acceptance(p: float, config: CorrectionSection) -> float:
    """Chance that a model which only guesses gets a wrong trajectory accepted: per attempt, at least
    `needed_votes` of `votes` guesses hit gold and the rewrite's guess hits it again; over M attempts."""
    votes, need = config.votes, config.needed_votes
    stable = sum(comb(votes, j) * p**j * (1 - p) ** (votes - j) for j in range(need, votes + 1))
    per_attempt = stable * p
    return 1 - (1 - per_attempt) ** config.attempts


def placebo_target(question: Question, rejected: str, key: str) -> str | None:
    """A stand-in gold for the placebo: one option that is neither gold nor the rejected answer, chosen by
    a hash of the trajectory's key (reproducible); None for a multi-answer question (no single stand-in)."""
    if question.is_multi_answer:
        return None
    others = sorted(set(question.options) - set(question.answer) - set(rejected))
    if not others:
        return None
    return others[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(others)]


def placebo_acceptance(
    records: Sequence[dict], config: CorrectionSection, questions: Mapping[str, Question], rejected: Mapping
) -> dict:
    """Chance, measured on the same trajectories: how many would have been accepted had the gold been
    another wrong option (`placebo_target`). Per attempt: were `needed_votes` of the real votes on the
    stand-in, times `rewrite_follows`. A corrector that only guessed among the options it was not told are
    wrong would be accepted as often for the stand-in as for gold; the analytic `expected_by_guessing`
    assumes independent uniform votes and rewrite, and is lower.

    Attempts that did not run: the real run stops at the first attempt accepted for gold, where the placebo
    (its stand-in missed) would have gone on to attempt M. Every attempt of a trajectory asks the same prompt
    on a fresh seed, so a missing attempt counts at `imputed_rate`: the share of attempts that ran after a
    stable one (the corrector had reached gold, as in the trajectories that stopped) whose votes settled on
    the stand-in; with none recorded, the share of first attempts (every trajectory has one). `expected`
    counts them; `expected_observed` counts only attempts that ran (a lower bound).

    Not measured, assumed: `rewrite_follows` is the share of stable attempts whose rewrite was accepted,
    measured on rewrites of gold-reaching analyses; no rewrite is run from a stand-in's analysis."""
    need = config.needed_votes
    stable = [a for r in records for a in r["attempts"] if a["stable"] and a["rewrite"] is not None]
    follow = sum(a["accepted"] for a in stable) / len(stable) if stable else 1.0  # none seen: assume it follows
    targets = {}
    for r in records:
        key = _key(r)
        target = placebo_target(questions[r["question_id"]], rejected.get(key, ""), f"{key[0]}#{key[1]}#placebo")
        if target is not None:
            targets[key] = target

    def on_target(attempt: dict, target: str) -> bool:
        return sum(v["predicted"] == target for v in attempt["votes"]) >= need

    after_stable = [
        on_target(later, targets[key])
        for r in records
        if (key := _key(r)) in targets
        for earlier, later in zip(r["attempts"], r["attempts"][1:])
        if earlier["stable"]
    ]
    first = [
        on_target(r["attempts"][0], targets[key]) for r in records if (key := _key(r)) in targets and r["attempts"]
    ]
    sample, source = (after_stable, "attempts after a stable one") if after_stable else (first, "first attempts")
    rate = sum(sample) / len(sample) if sample else 0.0
    expected = observed = 0.0
    imputed = 0
    for r in records:
        target = targets.get(_key(r))
        if target is None:
            continue
        missed = 1.0
        for attempt in r["attempts"]:
            missed *= 1 - (follow if on_target(attempt, target) else 0.0)
        observed += 1 - missed
        # Attempts stop only at an accepted one: the placebo would have run the rest.
        left = max(0, config.attempts - len(r["attempts"])) if r["attempts"] and r["attempts"][-1]["accepted"] else 0
        imputed += left
        expected += 1 - missed * (1 - follow * rate) ** left
    return {
        "expected": expected,
        "expected_observed": observed,
        "trajectories": len(targets),
        "imputed_attempts": imputed,
        "imputed_rate": rate,
        "imputed_rate_from": f"{source} (n={len(sample)})",
        "rewrite_follows": follow,
        "rewrite_follows_from": "rewrites of gold-reaching analyses (no rewrite is run from a stand-in's)",
    }


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
