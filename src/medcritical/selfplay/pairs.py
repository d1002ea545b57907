"""Preference pairs for DPO: chosen = a verified correction (or a correct sample), rejected = a wrong
trajectory of the same question.

The prompt of a pair is the ORIGINAL mcq prompt (what the student sees at test time) and chosen is a
standalone answer to it: the student's rewrite of a stable correction (see selfplay.correction),
never the correction itself, which talks about an earlier attempt the prompt does not contain. DPO
teaches the model to answer the question the right way first time. A chosen text whose reasoning
concludes other letters than its final answer is never chosen (`reasoning_agrees`). `pairs.level:
answer` (the paper's answer-level ablation) gives both sides the chosen reasoning and varies only the
final answer statement (`answer_level`). Pairs are written in
TRL's conversational preference format (prompt / chosen / rejected as chat messages) plus a few
metadata columns TRL ignores.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence

from medcritical.data.cmexam import Question
from medcritical.grader import THINK_END, THINK_START, extract_answer_letters
from medcritical.prompts import mcq_messages
from medcritical.selfplay.config import PairsSection
from medcritical.selfplay.standalone import in_trained_format, refers_back

log = logging.getLogger(__name__)


def answer_statement(text: str) -> str:
    """The final answer statement of a trajectory: what follows the last </think>, else its last line."""
    _, sep, tail = text.rpartition(THINK_END)
    if sep:
        return tail.strip()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def reasoning_of(text: str) -> str:
    """The reasoning of a trajectory: inside <think>…</think> ("" without a closed block)."""
    head, sep, _ = text.rpartition(THINK_END)
    return head.replace(THINK_START, "").strip() if sep else ""


def reasoning_agrees(text: str, options: Mapping[str, str]) -> bool:
    """False when the reasoning concludes letters (its last clear answer statement, read by the one grader)
    other than the final answer's: such a chosen text would teach reasoning to one answer and stating
    another. Reasoning that concludes no letter cannot be checked and passes."""
    concluded = extract_answer_letters(reasoning_of(text), options)
    return not concluded or concluded == extract_answer_letters(text, options)


def answer_level(chosen: str, rejected: str) -> tuple[str, str]:
    """An answer-level pair: the chosen reasoning on both sides, only the final answer statements differ.
    The shared reasoning cancels in DPO's log-ratio, so the preference falls on the answer span alone,
    and neither side teaches skipping the reasoning. Without a closed reasoning block: the answers alone."""
    cut = chosen.rfind(THINK_END)
    if cut < 0:
        return answer_statement(chosen), answer_statement(rejected)
    # The shared prefix is the chosen text up to its answer statement, the whitespace after </think>
    # included: a different line break would be one more token the two sides differ in.
    tail = chosen[cut + len(THINK_END) :]
    prefix = chosen[: len(chosen) - len(tail.lstrip())]
    return prefix + answer_statement(chosen), prefix + answer_statement(rejected)


def _whole(text: str) -> str:
    return text


def _unique_by_text(records: list[dict], text_key: str, cut=_whole) -> tuple[list[dict], int]:
    seen, unique = set(), []
    for r in records:
        text = cut(r[text_key]).strip()
        if text not in seen:
            seen.add(text)
            unique.append(r)
    return unique, len(records) - len(unique)


def _pairs_for_question(
    question: Question,
    rollouts: list[dict],
    corrections: Mapping[int, dict],
    config: PairsSection,
    language: str,
    drops: Counter,
) -> list[dict]:
    thought = config.level == "thought"
    cut = _whole if thought else answer_statement
    wrong, duplicates = _unique_by_text([r for r in rollouts if not r["correct"]], "trajectory", cut)
    drops["duplicate_rejected"] += duplicates
    correct, _ = _unique_by_text([r for r in rollouts if r["correct"]], "trajectory", cut)
    # A chosen text must answer the prompt alone, in the trained format: a sample that talks about an
    # earlier attempt, or never closes its reasoning, is not one to prefer.
    alone = [r for r in correct if not refers_back(r["trajectory"])]
    standalone = [r for r in alone if in_trained_format(r["trajectory"])]
    drops["refers_back"] += len(correct) - len(alone)
    drops["chosen_format"] += len(alone) - len(standalone)
    agreeing = [r for r in standalone if reasoning_agrees(r["trajectory"], question.options)]
    drops["reasoning_disagrees"] += len(standalone) - len(agreeing)
    standalone = agreeing
    pairs, seen = [], set()
    for n, rejected in enumerate(wrong):
        candidates = []
        correction = corrections.get(rejected["sample"])
        if correction and correction["corrected"]:
            if reasoning_agrees(correction["chosen"], question.options):
                candidates.append(("correction", correction["chosen"], correction["chosen_tokens"]))
            else:
                drops["reasoning_disagrees"] += 1
        if config.use_correct_samples and standalone:
            # Rotate so that different wrong trajectories are paired with different correct samples.
            shift = n % len(standalone)
            candidates += [
                ("sample", r["trajectory"], r["num_tokens"]) for r in standalone[shift:] + standalone[:shift]
            ]
        if not candidates:
            drops["no_chosen"] += 1
            continue
        # A chosen much longer than rejected teaches "write more", not "reason right" (answer statements
        # are a line each: no length filter there).
        short_enough = [
            c for c in candidates if not thought or c[2] <= config.max_length_ratio * max(rejected["num_tokens"], 1)
        ]
        if not short_enough:
            drops["too_long"] += 1
            continue
        source, chosen, chosen_tokens = short_enough[0]
        if thought:
            rejected_text = rejected["trajectory"]
        else:
            chosen, rejected_text = answer_level(chosen, rejected["trajectory"])
        key = (chosen.strip(), rejected_text.strip())
        if key in seen:
            drops["duplicate_pair"] += 1
            continue
        seen.add(key)
        pairs.append(
            {
                "prompt": mcq_messages(question, language),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected_text}],
                "question_id": question.id,
                "rejected_sample": rejected["sample"],
                "chosen_source": source,
                "level": config.level,
                "chosen_tokens": chosen_tokens,
                "rejected_tokens": rejected["num_tokens"],
                # Same letters on both sides would teach nothing about the answer (kept to be counted: none expected).
                "same_letters": extract_answer_letters(chosen, question.options)
                == extract_answer_letters(rejected_text, question.options),
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
    rank = sorted(
        range(len(pairs)),
        key=lambda i: hashlib.sha256(
            f"{seed}:{pairs[i]['question_id']}:{pairs[i]['rejected_sample']}".encode()
        ).hexdigest(),
    )
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
            question,
            by_question.get(question.id, []),
            corrections_by_question.get(question.id, {}),
            config,
            language,
            drops,
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
        "dropped": {
            k: drops[k]
            for k in (
                "duplicate_rejected",
                "refers_back",
                "chosen_format",
                "no_chosen",
                "too_long",
                "duplicate_pair",
                "over_cap",
                "reasoning_disagrees",
            )
        },
        "wrong_trajectories": wrong,
        "level": config.level,
        "diagnostics": pair_diagnostics(train + heldout),
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
        len(train),
        len(heldout),
        len(pairs_by_question),
        dict(stats["dropped"]),
    )
    return train, heldout, stats


def _distribution(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "min": ordered[0],
        "p25": quartiles[0],
        "median": quartiles[1],
        "p75": quartiles[2],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def pair_diagnostics(pairs: Sequence[dict]) -> dict:
    """How chosen differs from rejected beyond correctness. Pairs separable by length or style alone
    let DPO's loss fall to ~0 at once without teaching reasoning (the paper's loss curves hint at it).

    Lengths in characters (both levels) and generated tokens (thought level); ratios chosen/rejected
    per pair; the share of pairs whose two sides state the same letters (should be 0); the share whose
    chosen is a verified correction's rewrite against a correct sample of the student.
    """
    if not pairs:
        return {"pairs": 0}
    chosen_chars = [len(p["chosen"][-1]["content"]) for p in pairs]
    rejected_chars = [len(p["rejected"][-1]["content"]) for p in pairs]
    sources = Counter(p["chosen_source"] for p in pairs)
    diagnostics = {
        "pairs": len(pairs),
        "chosen_chars": _distribution(chosen_chars),
        "rejected_chars": _distribution(rejected_chars),
        "chars_ratio": _distribution([c / max(r, 1) for c, r in zip(chosen_chars, rejected_chars)]),
        "same_letters_share": sum(bool(p.get("same_letters")) for p in pairs) / len(pairs),
        "from_correction_share": sources["correction"] / len(pairs),
        "from_sample_share": sources["sample"] / len(pairs),
    }
    if all(p.get("level", "thought") == "thought" for p in pairs):
        chosen_tokens = [p["chosen_tokens"] for p in pairs]
        rejected_tokens = [p["rejected_tokens"] for p in pairs]
        diagnostics["chosen_tokens"] = _distribution(chosen_tokens)
        diagnostics["rejected_tokens"] = _distribution(rejected_tokens)
        diagnostics["tokens_ratio"] = _distribution([c / max(r, 1) for c, r in zip(chosen_tokens, rejected_tokens)])
    return diagnostics
