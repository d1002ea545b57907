"""Preference pairs for DPO: chosen = a verified correction (or a correct sample), rejected = a wrong
trajectory of the same question.

The prompt of a pair is the ORIGINAL mcq prompt (what the student sees at test time) and chosen is
the corrected answer written as the assistant's reply to it: DPO teaches the model to answer the
question the right way first time. Pairs are written in TRL's conversational preference format
(prompt / chosen / rejected as chat messages) plus a few metadata columns TRL ignores.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Mapping, Sequence

from medcritical.data.cmexam import Question
from medcritical.prompts import mcq_messages
from medcritical.selfplay.config import PairsSection

log = logging.getLogger(__name__)


def _unique_by_text(records: list[dict], text_key: str) -> tuple[list[dict], int]:
    seen, unique = set(), []
    for r in records:
        text = r[text_key].strip()
        if text not in seen:
            seen.add(text)
            unique.append(r)
    return unique, len(records) - len(unique)


def _pairs_for_question(
    question: Question, rollouts: list[dict], corrections: Mapping[int, dict], config: PairsSection, language: str, drops: Counter
) -> list[dict]:
    wrong, duplicates = _unique_by_text([r for r in rollouts if not r["correct"]], "trajectory")
    drops["duplicate_rejected"] += duplicates
    correct, _ = _unique_by_text([r for r in rollouts if r["correct"]], "trajectory")
    pairs, seen = [], set()
    for n, rejected in enumerate(wrong):
        candidates = []
        correction = corrections.get(rejected["sample"])
        if correction and correction["corrected"]:
            candidates.append(("correction", correction["correction"], correction["correction_tokens"]))
        if config.use_correct_samples and correct:
            # Rotate so that different wrong trajectories are paired with different correct samples.
            shift = n % len(correct)
            candidates += [("sample", r["trajectory"], r["num_tokens"]) for r in correct[shift:] + correct[:shift]]
        if not candidates:
            drops["no_chosen"] += 1
            continue
        # A chosen much longer than rejected teaches "write more", not "reason right".
        short_enough = [c for c in candidates if c[2] <= config.max_length_ratio * max(rejected["num_tokens"], 1)]
        if not short_enough:
            drops["too_long"] += 1
            continue
        source, chosen, chosen_tokens = short_enough[0]
        key = (chosen.strip(), rejected["trajectory"].strip())
        if key in seen:
            drops["duplicate_pair"] += 1
            continue
        seen.add(key)
        pairs.append(
            {
                "prompt": mcq_messages(question, language),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected["trajectory"]}],
                "question_id": question.id,
                "rejected_sample": rejected["sample"],
                "chosen_source": source,
                "chosen_tokens": chosen_tokens,
                "rejected_tokens": rejected["num_tokens"],
            }
        )
    # Verified corrections first: they are the method's signal; correct samples fill in.
    pairs.sort(key=lambda p: p["chosen_source"] != "correction")
    drops["over_cap"] += max(0, len(pairs) - config.max_pairs_per_question)
    return pairs[: config.max_pairs_per_question]


def _heldout_questions(question_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded, order-independent choice of held-out questions: at least one held out and one kept
    for training whenever there are two or more questions and fraction > 0."""
    if fraction <= 0 or len(question_ids) < 2:
        return set()
    rank = sorted(question_ids, key=lambda q: hashlib.sha256(f"{seed}:{q}".encode()).hexdigest())
    count = min(max(1, round(fraction * len(rank))), len(rank) - 1)
    return set(rank[:count])


def _seeded_subset(pairs: list[dict], limit: int, seed: int) -> list[dict]:
    """`limit` pairs chosen by a seeded hash of (question, rejected sample), kept in their order."""
    rank = sorted(range(len(pairs)), key=lambda i: hashlib.sha256(
        f"{seed}:{pairs[i]['question_id']}:{pairs[i]['rejected_sample']}".encode()).hexdigest())
    keep = set(rank[:limit])
    return [p for i, p in enumerate(pairs) if i in keep]


def build_preference_pairs(
    questions: Sequence[Question],
    rollouts: Sequence[dict],
    corrections: Sequence[dict],
    config: PairsSection,
    *,
    language: str = "zh",
    seed: int = 0,
) -> tuple[list[dict], list[dict], dict]:
    """(train pairs, held-out pairs, statistics). Held-out pairs come from whole questions never seen
    in training, so their reward accuracy measures generalisation, not memory."""
    by_question: dict[str, list[dict]] = {}
    for r in rollouts:
        by_question.setdefault(r["question_id"], []).append(r)
    corrections_by_question: dict[str, dict[int, dict]] = {}
    for c in corrections:
        corrections_by_question.setdefault(c["question_id"], {})[c["sample"]] = c
    drops: Counter = Counter()
    pairs_by_question = {}
    for question in questions:
        pairs = _pairs_for_question(
            question, by_question.get(question.id, []), corrections_by_question.get(question.id, {}), config, language, drops
        )
        if pairs:
            pairs_by_question[question.id] = pairs
    heldout_ids = _heldout_questions(list(pairs_by_question), config.heldout_fraction, seed)
    train = [p for q, ps in pairs_by_question.items() if q not in heldout_ids for p in ps]
    heldout = [p for q, ps in pairs_by_question.items() if q in heldout_ids for p in ps]
    if config.max_pairs is not None and len(train) > config.max_pairs:
        drops["over_max_pairs"] = len(train) - config.max_pairs
        train = _seeded_subset(train, config.max_pairs, seed)
    wrong = sum(not r["correct"] for r in rollouts)
    stats = {
        "pairs": len(train) + len(heldout),
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "questions_with_pairs": len(pairs_by_question),
        "heldout_questions": len(heldout_ids),
        "chosen_source": dict(Counter(p["chosen_source"] for p in train + heldout)),
        "dropped": {k: drops[k] for k in ("duplicate_rejected", "no_chosen", "too_long", "duplicate_pair", "over_cap")},
        "wrong_trajectories": wrong,
    }
    if drops["over_max_pairs"]:
        stats["dropped"]["over_max_pairs"] = drops["over_max_pairs"]
    if not train:
        stats["no_pairs"] = (
            "no wrong trajectory at all: every sample was correct, nothing to prefer against"
            if not wrong
            else "no wrong trajectory has a verified correction or a correct sample that passes the filters"
        )
        log.warning("pairs: no training pairs (%s)", stats["no_pairs"])
    log.info(
        "pairs: %d train + %d held-out from %d questions (dropped %s)",
        len(train), len(heldout), len(pairs_by_question), dict(stats["dropped"]),
    )
    return train, heldout, stats
