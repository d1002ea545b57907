"""Paired statistics: exact McNemar, the paired bootstrap, the run report's table and `medcritical compare`."""

import json
import math

import numpy as np
import pytest

from medcritical.analysis.stats import mcnemar_exact, paired_bootstrap, paired_comparison, paired_table
from medcritical.cli import main


def test_mcnemar_exact_known_values():
    assert mcnemar_exact(1, 5) == pytest.approx(2 * (1 + 6) / 2**6)  # 0.21875, by hand
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact(7, 7) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(40, 60) == pytest.approx(0.05689, abs=1e-5)  # scipy.stats.binomtest(40, 100).pvalue
    assert mcnemar_exact(1500, 1700) < 0.001  # thousands of discordant questions: exact, no underflow


def test_mcnemar_exact_is_the_exact_binomial_tail():
    # The definition in exact integers (the library calls scipy's binomtest): 2 x P(X <= min(b, c)), capped at 1.
    for b, c in [(3, 12), (25, 31), (100, 140), (9, 8), (0, 3)]:
        n = b + c
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
        assert mcnemar_exact(b, c) == pytest.approx(min(1.0, 2 * tail / 2**n), rel=1e-9)


def test_paired_bootstrap_matches_resampling_questions():
    b, c, n = 10, 30, 200
    low, high = paired_bootstrap(b, c, n)
    sd = math.sqrt(((b + c) / n - ((c - b) / n) ** 2) / n)  # normal approximation: 0.1 +- 1.96 sd
    assert low == pytest.approx(0.1 - 1.96 * sd, abs=0.01) and high == pytest.approx(0.1 + 1.96 * sd, abs=0.01)
    # The same as resampling question indices directly.
    differences = np.array([-1] * b + [1] * c + [0] * (n - b - c))
    draws = np.random.default_rng(1).integers(0, n, size=(4000, n))
    brute = np.percentile(differences[draws].mean(axis=1), [2.5, 97.5])
    assert low == pytest.approx(brute[0], abs=0.01) and high == pytest.approx(brute[1], abs=0.01)


def test_paired_comparison_counts_discordant_questions():
    first = {"q1": True, "q2": True, "q3": False, "q4": False, "q5": True}
    second = {"q1": True, "q2": False, "q3": True, "q4": True, "q6": True}
    result = paired_comparison(first, second)
    assert (result["n"], result["only_first_correct"], result["only_second_correct"]) == (4, 1, 2)
    assert result["difference"] == 0.25 and result["unpaired_questions"] == 2
    assert result["mcnemar_p"] == 1.0
    rows = paired_table({"base": first, "sft": second, "dpo": first})
    assert [(r["first"], r["second"]) for r in rows] == [("base", "sft"), ("base", "dpo"), ("sft", "dpo")]
    with pytest.raises(ValueError, match="share no question"):
        paired_comparison({"a": True}, {"b": True})


def _evaluation(folder, correct, protocol="mcq"):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"protocol": protocol, "scoring": "generate"}))
    (folder / "graded.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "correct": c}) + "\n" for i, c in enumerate(correct))
    )


def test_compare_cli_on_evaluation_and_run_folders(tmp_path, capsys):
    before = [True] * 30 + [False] * 70
    after = [True] * 30 + [True] * 20 + [False] * 50  # 20 more right, none lost
    _evaluation(tmp_path / "a", before)
    _evaluation(tmp_path / "b", after)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| 100 | 0 | 20 | +20.0 | +12.0 to +28.0 † | <0.0001 |" in out  # 20 discordant: marked

    for run, correct in (("run1", before), ("run2", after)):
        _evaluation(tmp_path / run / "eval-sft", correct)
        _evaluation(tmp_path / run / "eval-base", before)
    assert main(["compare", str(tmp_path / "run1"), str(tmp_path / "run2"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["difference"] for r in rows] == [0.0, 0.2]

    _evaluation(tmp_path / "judge", before, protocol="judge")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "judge")]) == 2
    assert "different protocols" in capsys.readouterr().err


def test_run_report_shows_the_paired_tests(tmp_path):
    from medcritical.orchestration.recipe import load_recipe
    from medcritical.orchestration.report import write_run_report

    base = {f"q{i}": i < 25 for i in range(100)}
    sft = {f"q{i}": i < 45 for i in range(100)}
    evaluations = {
        name: {
            "protocol": "mcq",
            "accuracy": sum(c.values()) / 100,
            "correct": sum(c.values()),
            "n": 100,
            "ci95": [0, 1],
        }
        for name, c in (("base", base), ("sft", sft))
    } | {"dpo": None}
    write_run_report(load_recipe(), evaluations, {}, tmp_path, correct_by_model={"base": base, "sft": sft, "dpo": None})
    markdown = (tmp_path / "report.md").read_text()
    assert "| base → sft | 100 | 0 | 20 | +20.0 |" in markdown
    paired = json.loads((tmp_path / "report.json").read_text())["paired"]
    assert len(paired) == 1 and paired[0]["mcnemar_p"] == mcnemar_exact(0, 20)
