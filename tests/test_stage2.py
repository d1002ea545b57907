"""Stage-2 pieces that are plain arithmetic or text rules: back-references, cost sums, McNemar, even
held-out batches. The behaviour on real runs is in test_rollout / test_pairs / test_selfplay."""

from math import comb

import pytest

from medcritical.analysis.stats import mcnemar_exact
from medcritical.io.jsonl import append_jsonl
from medcritical.selfplay.cost import cost_statistics
from medcritical.selfplay.standalone import (
    in_trained_format,
    prompt_fragments,
    refers_back,
)
from medcritical.training.dpo import even_eval_batch_size


@pytest.mark.parametrize(
    "text",
    [
        "<think>之前的回答忽略了禁忌证</think>\n答案：B",
        "<think>上一次选A是错的</think>\n答案：B",
        "<think>原答案错误在于把病位弄错</think>\n答案：B",
        "<think>My mistake was the dose.</think>\nAnswer: B",
        "<think>The previous answer ignored the history.</think>\n答案：B",
        "<think>找出之前推理中的错误：剂量</think>\n答案：B",  # the correction prompt's own wording
        "<think>根据参考分析，选B</think>\n答案：B",  # the rewrite prompt's wording
    ],
)
def test_back_references_are_found_in_both_languages(text):
    assert refers_back(text)


def test_a_plain_answer_does_not_refer_back():
    assert refers_back("<think>肺胀日久，肺肾气虚，治宜补肺纳肾，降气平喘。</think>\n答案：B") is None
    # The question prompt's own wording (exam name, answer format) is not a reference back.
    assert not any("执业医师资格考试的一道选择题" in f for f in prompt_fragments("correction"))
    assert in_trained_format("<think>x</think>\n答案：B") and not in_trained_format("<think>x 答案：B")


def test_cost_sums_tokens_by_who_generated_them_and_divides_by_pairs(tmp_path):
    rollouts = [
        {"sample": 0, "num_tokens": 10, "prompt_tokens": 50},
        {"sample": 1, "num_tokens": 20, "prompt_tokens": 50},
    ]
    vote = {"prompt_tokens": 100, "completion_tokens": 30}
    rewrite = {"prompt_tokens": 80, "completion_tokens": 15}
    corrections = [
        {"corrector": "teacher", "attempts": [{"votes": [vote, vote], "rewrite": rewrite}]},
        {"corrector": "teacher", "attempts": [{"votes": [vote], "rewrite": None}]},
    ]
    pairs = [{"chosen_source": "correction"}, {"chosen_source": "sample"}]
    append_jsonl(
        [{"phase": "rollout", "wall_s": 2.0, "cpu_s": 1.5}, {"phase": "rewrite", "wall_s": 1.0, "cpu_s": 0.5}],
        tmp_path / "timings.jsonl",
    )
    stats = cost_statistics(
        rollouts,
        corrections,
        pairs,
        tmp_path / "timings.jsonl",
        gpus=0,
        teacher_price_per_million_tokens=10.0,
        device_hour_price=3.6,
    )
    assert stats["teacher"] == {"prompt_tokens": 300, "completion_tokens": 90}
    # The rollout prompt is counted once per question (the k samples share one request).
    assert stats["student_by_phase"]["rollout"] == {"prompt_tokens": 50, "completion_tokens": 30}
    assert stats["student"] == {"prompt_tokens": 130, "completion_tokens": 45}
    assert stats["seconds"]["device_seconds"] == pytest.approx(2.0)  # CPU seconds on CPU
    assert stats["money"]["teacher"] == pytest.approx(390 * 10 / 1e6)
    assert stats["money"]["device"] == pytest.approx(2.0 / 3600 * 3.6)
    assert (stats["money"]["currency"], stats["money"]["estimate"]) == ("USD", True)
    assert stats["per_pair"]["teacher_tokens"] == 195 and stats["per_pair"]["student_tokens"] == 87.5
    # Only the correction machinery (votes, rewrite, teacher) over the one pair it produced: the 1.0 s
    # rewrite phase, not the 2.0 s rollout, and its money beside it.
    assert stats["per_correction_pair"] == pytest.approx(
        {"student_tokens": 95, "teacher_tokens": 390, "device_seconds": 0.5, "money": 390 * 10 / 1e6 + 0.5 / 3600 * 3.6}
    )
    on_gpu = cost_statistics(
        rollouts,
        corrections,
        pairs,
        tmp_path / "timings.jsonl",
        gpus=2,
        teacher_price_per_million_tokens=None,
        device_hour_price=None,
    )
    assert on_gpu["seconds"]["device_seconds"] == pytest.approx(6.0) and on_gpu["money"] is None


def _arms_mcnemar_p(b: int, c: int) -> float:
    """The arms table's former copy of the test (float arithmetic), kept as the reference it must still match."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * (sum(comb(n, i) for i in range(min(b, c) + 1)) / 2**n))


def test_mcnemar_exact_p():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(3, 7) == pytest.approx(2 * sum(comb(10, i) for i in range(4)) / 2**10)


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (1, 0), (0, 5), (3, 7), (7, 3), (6, 6), (12, 40), (250, 310)])
def test_the_arms_table_p_is_the_one_it_printed_before(b, c):
    # arms used its own copy of the exact McNemar test; the shared one (scipy's binomtest) must print the same
    # figures: equal to the last digits (scipy sums in floats), the same at the 3 significant digits printed.
    assert mcnemar_exact(b, c) == pytest.approx(_arms_mcnemar_p(b, c), rel=1e-12)
    assert f"{mcnemar_exact(b, c):.3g}" == f"{_arms_mcnemar_p(b, c):.3g}"


def test_heldout_batches_are_even():
    assert even_eval_batch_size(9, 4) == 3 and even_eval_batch_size(8, 4) == 4 and even_eval_batch_size(7, 4) == 1
    assert even_eval_batch_size(12, 4, world_size=2) == 3  # 2 processes x 3 = 6 pairs a step


def test_arms_table_shows_cost_per_correction_pair_beside_cost_per_pair():
    """Issue 24: the arms table showed cost per pair only; with correct samples among the chosen answers
    that divides the correction's cost by pairs it never made. The cost per correction pair is beside it."""
    from medcritical.orchestration.arms import arm_rows

    rollout = {
        "corrector": {"corrector": "teacher", "backend": "openai"},
        "pairs": {"pairs": 10, "level": "thought", "diagnostics": {}},
        "cost": {
            "seconds": {"device": "gpu"},
            "money": {"total": 0.1, "currency": "EUR", "estimate": True},
            "pairs_from_corrections": 4,
            "per_pair": {"student_tokens": 100.0, "teacher_tokens": 40.0, "device_seconds": 2.0, "money": 0.01},
            "per_correction_pair": {
                "student_tokens": 50.0,
                "teacher_tokens": 100.0,
                "device_seconds": 1.5,
                "money": 0.02,
            },
        },
    }
    arm = {"before": None, "after": None, "graded_before": None, "graded_after": None, "rounds": [{"rollout": rollout}]}
    rows = arm_rows(arm)
    assert rows["teacher tokens per pair"] == "40" and rows["teacher tokens per correction pair"] == "100"
    assert rows["pairs from a correction"] == "4"
    assert rows["correction gpu-seconds per correction pair"] == "1.5"
    # Money carries its currency and says it is an estimate (the prices are the user's).
    assert rows["money per correction pair (estimate, EUR)"] == "0.02"
    assert rows["money per pair (estimate, EUR)"] == "0.01"


def test_rollout_command_prints_money_as_an_estimate_in_its_currency():
    """Issue 24 item 9: `medcritical rollout` printed "0.1234 money": no currency, not called an estimate."""
    from medcritical.cli.selfplay import money_estimate

    line = money_estimate({"teacher": 0.1, "device": 0.0234, "total": 0.1234, "currency": "EUR", "estimate": True})
    assert line == ", estimated 0.1234 EUR (at your selfplay.cost prices)"


def test_cost_counts_the_gpus_generation_used_not_every_visible_one(monkeypatch):
    """Issue 24 item 9: device-seconds multiplied wall time by every visible GPU."""
    import torch

    from medcritical.selfplay.cost import accelerators

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert accelerators("cuda", 1) == 1  # transformers: one GPU of eight
    assert accelerators("cuda", 2) == 2  # vLLM with tensor_parallel_size 2
    assert accelerators("cpu", 2) == 0


def test_few_discordant_questions_mark_the_bootstrap_interval():
    """Issue 24 item 9: with few discordant pairs the percentile bootstrap is anti-conservative; the table
    says so where the interval is shown."""
    from medcritical.analysis.stats import paired_comparison, paired_markdown

    ids = [str(i) for i in range(100)]
    few = paired_comparison({i: int(i) < 50 for i in ids}, {i: int(i) < 53 for i in ids})  # 3 differ
    many = paired_comparison({i: int(i) < 30 for i in ids}, {i: int(i) < 60 for i in ids})  # 30 differ
    assert few["bootstrap_reliable"] is False and many["bootstrap_reliable"] is True
    table = "\n".join(paired_markdown([{"first": "a", "second": "b", **few}]))
    assert " †" in table and "anti-conservative" in table and "McNemar" in table
    assert "†" not in "\n".join(paired_markdown([{"first": "a", "second": "b", **many}]))


def _arm(accuracy_after: float, *, priced: bool = True, tokens: bool = True) -> dict:
    """A `load_arm` result with every kind of cell: shares, counts, floats below and above 1000, missing figures."""
    diagnostics = (
        {
            "from_correction_share": 0.625,
            "same_letters_share": 0.0,
            "chosen_tokens": {"median": 312.5},
            "rejected_tokens": {"median": 1480.0},
            "tokens_ratio": {"median": 0.21118},
        }
        if tokens
        else {
            "from_correction_share": None,
            "same_letters_share": 1.0,
            "chosen_chars": {"median": 901},
            "rejected_chars": {"median": 12345.678},
            "chars_ratio": {"median": 1.0},
        }
    )
    money = {"money": 0.0123456} if priced else {}
    rollout = {
        "corrector": {"corrector": "teacher", "backend": "openai"},
        "pairs": {"level": "trajectory", "pairs": 40, "diagnostics": diagnostics},
        "rollout": {"pass@1": 0.41234, "pass@k": 0.9},
        "correction": {
            "corrected": 17,
            "wrong_trajectories": 55,
            "expected_by_guessing": 3.14159,
            **({"placebo": {"expected": 4.5}} if priced else {}),
        },
        "cost": {
            "seconds": {"device": "GPU"},
            "pairs_from_corrections": 25,
            "per_pair": {"student_tokens": 1234.5678, "teacher_tokens": 0.000123456, "device_seconds": 2.5, **money},
            **({"money": {"currency": "EUR"}} if priced else {}),
            "per_correction_pair": {
                "student_tokens": 999.99,
                "teacher_tokens": 77,
                "device_seconds": 1e-9,
                **({"money": 12.0} if priced else {}),
            },
        },
    }
    dpo = {
        "heldout_after_first_epoch": {"reward_accuracy": 0.5555},
        "train_seconds": 123.4,
        "heldout": {"reward_accuracy": 0.75, "measured_on": "the reporting half"},
        "kept": {"model": "best", "why": "highest held-out reward accuracy", "training_loss": 0.6931},
        "loss_first": 0.693147,
        "loss_last": 0.0004567,
    }
    return {
        "run": "runs/arm",
        "before": {"accuracy": 0.4, "n": 10},
        "after": {"accuracy": accuracy_after, "n": 10},
        "graded_before": {"1": False, "2": True, "3": False, "4": True},
        "graded_after": {"1": True, "2": True, "3": True, "4": accuracy_after > 0.5},
        "rounds": [{"rollout": rollout, "dpo": dpo}],
    }


def test_the_arms_table_reads_as_before():
    # The table is read by people and compared across runs: a change of its shared formatters must not show.
    from pathlib import Path

    from medcritical.orchestration.arms import arm_table

    nothing = {"run": "runs/none", "before": None, "after": None, "graded_before": None, "graded_after": None}
    tables = arm_table({"teacher": _arm(0.7), "self": _arm(0.35, priced=False, tokens=False)}) + "\n"
    tables += arm_table({"teacher": _arm(0.7), "nothing": {**nothing, "rounds": []}})
    assert tables == (Path(__file__).parent / "data" / "arms_table.md").read_text(encoding="utf-8")
