"""Paired statistics: did a model change move the answers on the same questions?

Two models graded on the same questions differ only on the questions one gets right and the other
wrong (the discordant pairs). The exact McNemar test asks whether those split evenly (no change);
the paired bootstrap gives a 95% interval for the accuracy difference. Both use the pairing, so they
separate small changes that two independent Wilson intervals (which overlap) cannot.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from scipy.stats import binomtest

from medcritical.errors import InputError

BOOTSTRAP_SAMPLES = 10_000
# Below this many discordant questions the percentile bootstrap's interval is too narrow (it resamples a
# handful of counts); the table marks it and the exact McNemar p is the figure to read.
FEW_DISCORDANT = 25


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(a binomial(b + c, 1/2) split at least this uneven), scipy's exact
    binomial test on the discordant pairs.

    b: questions only the first model gets right; c: only the second. p = 1 when b == c (or none differ).
    """
    if b + c == 0:
        return 1.0
    return float(binomtest(min(b, c), b + c, 0.5).pvalue)


def paired_bootstrap(b: int, c: int, n: int, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of accuracy(second) - accuracy(first) over questions resampled with replacement.

    A resampled difference depends only on how many discordant questions of each kind are drawn, so
    the resamples are multinomial counts of the three kinds (only the first right, only the second,
    alike): exact for the question-level bootstrap and fast at any n.
    """
    import numpy as np

    if n == 0:
        return (0.0, 0.0)
    counts = np.random.default_rng(seed).multinomial(n, [b / n, c / n, (n - b - c) / n], size=samples)
    differences = (counts[:, 1] - counts[:, 0]) / n
    low, high = np.percentile(differences, [2.5, 97.5])
    return (float(low), float(high))


def paired_comparison(first: Mapping[str, bool], second: Mapping[str, bool], *, seed: int = 0) -> dict:
    """McNemar and the bootstrap interval over the questions both were graded on (by question id)."""
    shared = sorted(first.keys() & second.keys())
    if not shared:
        raise InputError("the two evaluations share no question id: a paired comparison needs the same questions")
    b = sum(first[i] and not second[i] for i in shared)
    c = sum(second[i] and not first[i] for i in shared)
    n = len(shared)
    low, high = paired_bootstrap(b, c, n, seed=seed)
    return {
        "n": n,
        "only_first_correct": b,
        "only_second_correct": c,
        "accuracy_first": sum(first[i] for i in shared) / n,
        "accuracy_second": sum(second[i] for i in shared) / n,
        "difference": (c - b) / n,
        "difference_ci95": [round(low, 4), round(high, 4)],
        "mcnemar_p": mcnemar_exact(b, c),
        "bootstrap_reliable": b + c >= FEW_DISCORDANT,
        "unpaired_questions": len(first.keys() ^ second.keys()),
    }


def paired_table(correct_by_model: Mapping[str, Mapping[str, bool]], *, seed: int = 0) -> list[dict]:
    """`paired_comparison` for every two models, in the order given (base vs sft, base vs dpo, sft vs dpo)."""
    rows = []
    for (name_a, a), (name_b, b) in itertools.combinations(correct_by_model.items(), 2):
        rows.append({"first": name_a, "second": name_b, **paired_comparison(a, b, seed=seed)})
    return rows


def paired_markdown(rows: list[dict]) -> list[str]:
    """The comparisons as a Markdown table (differences in accuracy points, second minus first)."""
    if not rows:
        return []
    lines = [
        "| comparison | n | only first right | only second right | difference (points) | 95% CI (paired bootstrap) | exact McNemar p |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    few = False
    for r in rows:
        low, high = r["difference_ci95"]
        mark = "" if r["only_first_correct"] + r["only_second_correct"] >= FEW_DISCORDANT else " †"
        few = few or bool(mark)
        lines.append(
            f"| {r['first']} → {r['second']} | {r['n']} | {r['only_first_correct']} | {r['only_second_correct']} | "
            f"{100 * r['difference']:+.1f} | {100 * low:+.1f} to {100 * high:+.1f}{mark} | {_p(r['mcnemar_p'])} |"
        )
    if few:
        lines += [
            "",
            f"† fewer than {FEW_DISCORDANT} questions differ: the bootstrap interval is anti-conservative "
            "(too narrow); read the exact McNemar p.",
        ]
    return lines


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"
