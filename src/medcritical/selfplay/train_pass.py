"""Did DPO move the model on the questions it trained on? pass@1 before and after, paired.

Before: the round's rollout (the model DPO started from, k samples per question). After: the DPO
model answers the same questions with the same rollout settings and seed (the rollout code itself).
A tiny model's CMExam accuracy can stay at chance while this moves, which shows the loop working.

Paired per question: the exact McNemar test on the first sample (one right/wrong outcome per
question and model), and a bootstrap interval over questions for the change of the per-question
pass@1 (the mean over the k samples; resampling whole questions keeps their samples together).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from medcritical.analysis.diagnostics import diagnose_rollouts
from medcritical.analysis.stats import BOOTSTRAP_SAMPLES, mcnemar_exact
from medcritical.core.values import percent
from medcritical.data.cmexam import Question
from medcritical.data.splits import take
from medcritical.errors import InputError
from medcritical.io.fingerprint import check_resume, model_fingerprint, questions_fingerprint
from medcritical.modeling.config import GenerationSection
from medcritical.modeling.generation import load_generator
from medcritical.selfplay.config import RolloutSection
from medcritical.selfplay.rollout import rollout_questions

log = logging.getLogger(__name__)

TRAIN_PASS, TRAIN_PASS_STATS = "train_pass.jsonl", "train_pass.json"


def bootstrap_mean_interval(
    values: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    if not len(values):
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            values[rng.integers(0, len(values), size=(min(1000, samples - start), len(values)))].mean(axis=1)
            for start in range(0, samples, 1000)
        ]
    )
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def before_after(before: Sequence[dict], after: Sequence[dict], *, seed: int = 0) -> dict:
    """pass@1 before and after over the questions both answered, with the paired tests."""

    def by_question(records):
        grouped: dict[str, dict[int, bool]] = {}
        for r in records:
            grouped.setdefault(r["question_id"], {})[r["sample"]] = bool(r["correct"])
        return grouped

    b, a = by_question(before), by_question(after)
    shared = sorted(b.keys() & a.keys())
    if not shared:
        raise InputError("no question was answered both before and after DPO")

    def mean(samples: dict[int, bool]) -> float:
        return sum(samples.values()) / len(samples)

    def first(samples: dict[int, bool]) -> bool:
        return samples[min(samples)]

    differences = [mean(a[q]) - mean(b[q]) for q in shared]
    only_before = sum(first(b[q]) and not first(a[q]) for q in shared)
    only_after = sum(first(a[q]) and not first(b[q]) for q in shared)
    low, high = bootstrap_mean_interval(differences, seed=seed)
    pass_before = sum(mean(b[q]) for q in shared) / len(shared)
    pass_after = sum(mean(a[q]) for q in shared) / len(shared)
    return {
        "questions": len(shared),
        "pass@1_before": pass_before,
        "pass@1_after": pass_after,
        "difference": pass_after - pass_before,
        "difference_ci95": [round(low, 4), round(high, 4)],
        "first_sample": {
            "only_before_correct": only_before,
            "only_after_correct": only_after,
            "mcnemar_p": mcnemar_exact(only_before, only_after),
        },
    }


def train_pass(
    rollout: RolloutSection,
    generation: GenerationSection,
    questions: Sequence[Question],
    before: Sequence[dict],
    model_path: str | Path,
    output_dir: str | Path,
    *,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
) -> dict:
    """Answer the round's training questions (those in `before`, the rollout records; a seeded
    subset of `limit`) with the model at `model_path`; write train_pass.jsonl / .json; return the stats."""

    output_dir = Path(output_dir)
    asked = {r["question_id"] for r in before}
    chosen = take([q for q in questions if q.id in asked], limit, seed)
    if not chosen:
        raise InputError("none of the rollout's questions is among the training questions given")
    # A derived measurement: outputs of another model or setting are simply redone.
    check_resume(
        output_dir,
        {
            "model": model_fingerprint(model_path),
            "questions": questions_fingerprint(chosen),
            "rollout": rollout.model_dump(mode="json", exclude={"chunk_size"}),
            "seed": seed,
        },
        outputs=[TRAIN_PASS],
        restart=True,
        name="train_pass_fingerprint.json",
    )
    with load_generator(model_path, generation, device=device, dtype=dtype) as generator:
        after = rollout_questions(generator, chosen, rollout, output_dir / TRAIN_PASS, seed=seed)
    ids = {q.id for q in chosen}
    stats = before_after([r for r in before if r["question_id"] in ids], after, seed=seed)
    stats["format_after"] = diagnose_rollouts(after, {q.id: q for q in chosen}, rollout.max_new_tokens)
    (output_dir / TRAIN_PASS_STATS).write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    log.info(
        "training questions' pass@1 before -> after DPO: %.3f -> %.3f (%d questions; 95%% CI of the change %+.3f..%+.3f)",
        stats["pass@1_before"],
        stats["pass@1_after"],
        stats["questions"],
        *stats["difference_ci95"],
    )
    return stats


def train_pass_line(stats: dict | None) -> str:
    """The run report's line for one round."""
    if not stats:
        return "not measured"
    low, high = stats["difference_ci95"]
    first = stats["first_sample"]
    return (
        f"{percent(stats['pass@1_before'])}% → {percent(stats['pass@1_after'])}% "
        f"({stats['questions']} questions; change {100 * stats['difference']:+.1f} points, 95% CI "
        f"{100 * low:+.1f} to {100 * high:+.1f}; first sample {first['only_before_correct']} right only before, "
        f"{first['only_after_correct']} only after, exact McNemar p {first['mcnemar_p']:.4f})"
    )
