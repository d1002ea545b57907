"""What luck alone explains of the accepted corrections: the analytic figure for a model that only guesses
letters (`guessing_acceptance`, a lower bound) and the placebo measured on the same trajectories
(`placebo_acceptance`); `correction.correction_statistics` reports both."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from math import comb

from medcritical.data.cmexam import Question
from medcritical.selfplay.config import CorrectionSection
from medcritical.selfplay.records import trajectory_key


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
        key = trajectory_key(r)
        target = placebo_target(questions[r["question_id"]], rejected.get(key, ""), f"{key[0]}#{key[1]}#placebo")
        if target is not None:
            targets[key] = target

    def on_target(attempt: dict, target: str) -> bool:
        return sum(v["predicted"] == target for v in attempt["votes"]) >= need

    after_stable = [
        on_target(later, targets[key])
        for r in records
        if (key := trajectory_key(r)) in targets
        for earlier, later in zip(r["attempts"], r["attempts"][1:])
        if earlier["stable"]
    ]
    first = [
        on_target(r["attempts"][0], targets[key])
        for r in records
        if (key := trajectory_key(r)) in targets and r["attempts"]
    ]
    sample, source = (after_stable, "attempts after a stable one") if after_stable else (first, "first attempts")
    rate = sum(sample) / len(sample) if sample else 0.0
    expected = observed = 0.0
    imputed = 0
    for r in records:
        target = targets.get(trajectory_key(r))
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
