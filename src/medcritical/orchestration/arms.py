"""Two (or more) stage-2 arms side by side: e.g. self-correction against teacher correction.

An arm is a finished run folder, in either layout (the folder names are `staging`'s):
- `medcritical run` (the pipeline): eval-sft/, round<r>-rollout/, round<r>-dpo/, eval-dpo-round<R>/
- `medcritical selfplay`: round<r>-eval/, round<r>-rollout/, round<r>-dpo/, eval-dpo-round<R>/
R is the last round that ran (a round loop that stopped early names the final evaluation after it too).

`arm_table` reads their step statistics (never recomputes them) and writes one Markdown table:
CMExam accuracy before and after stage 2 with the per-question movement (exact McNemar test),
rollout pass@1, accepted corrections against what guessing alone explains, pair diagnostics,
held-out reward accuracy after the first DPO epoch, and the cost per pair. With two arms, their
final models are compared on the same questions too.
"""

from __future__ import annotations

import json
from itertools import count, takewhile
from pathlib import Path

from medcritical import storage
from medcritical.analysis.stats import mcnemar_exact
from medcritical.core.values import dotted, number_text, percent
from medcritical.errors import InputError, MissingInputError
from medcritical.evaluation.compare import correct_by_id
from medcritical.evaluation.report import GRADED_JSONL
from medcritical.evaluation.stage import EVALUATE
from medcritical.orchestration.staging import eval_folder, final_eval_folder, stage_folder
from medcritical.selfplay.stage import DPO, ROLLOUT


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _graded(folder: Path) -> dict[str, bool] | None:
    path = folder / GRADED_JSONL
    # Through the one reader, so an unusable judge verdict is dropped here as in report.json.
    return correct_by_id(path) if path.is_file() else None


def _round_numbers(root: Path) -> list[int]:
    """The rounds that ran: 1, 2, ... as long as the round's rollout folder is there."""
    return list(takewhile(lambda r: (root / stage_folder(ROLLOUT, r)).is_dir(), count(1)))


def load_arm(run_dir: str | Path) -> dict:
    """The statistics of one finished stage-2 run (see the module docstring for the layouts)."""
    if storage.is_s3(str(run_dir)):  # Path would make s3://b/x the local folder s3:/b/x
        raise InputError(
            f"{run_dir}: arms reads a local run folder; copy the run from S3 first (e.g. `aws s3 sync {run_dir} "
            "runs/NAME`) and give that folder"
        )
    root = Path(run_dir)
    if not root.is_dir():
        raise MissingInputError(f"{root}: no such run folder (give the run's output folder, e.g. runs/demo-arm-self)")
    rounds = _round_numbers(root)
    if not rounds:
        raise MissingInputError(
            f"{root}: no round folders ({stage_folder(ROLLOUT, 1)}/); is this the output of `medcritical run` or "
            "`medcritical selfplay`?"
        )
    # The model stage 2 starts from: the pipeline's SFT evaluation, or the round loop's first evaluation.
    sft_eval, loop_eval = root / eval_folder("sft"), root / stage_folder(EVALUATE, 1)
    before = loop_eval if loop_eval.is_dir() and not sft_eval.is_dir() else sft_eval
    after = root / final_eval_folder(rounds[-1])
    steps = [(root / stage_folder(ROLLOUT, r), root / stage_folder(DPO, r)) for r in rounds]
    return {
        "run": str(root),
        "before": _read(EVALUATE.stats_path(before)),
        "after": _read(EVALUATE.stats_path(after)),
        "graded_before": _graded(before),
        "graded_after": _graded(after),
        "rounds": [{"rollout": _read(ROLLOUT.stats_path(r)), "dpo": _read(DPO.stats_path(d))} for r, d in steps],
    }


def _movement(before: dict[str, bool] | None, after: dict[str, bool] | None) -> str:
    if not before or not after:
        return "-"
    common = before.keys() & after.keys()
    gained = sum(after[q] and not before[q] for q in common)
    lost = sum(before[q] and not after[q] for q in common)
    return f"+{gained} / -{lost} (McNemar p={mcnemar_exact(gained, lost):.3g})"


# The table's cells: three significant digits, and "-" where an arm has no such figure.
def _pct(value) -> str:
    return "-" if value is None else f"{percent(value)}%"


def _num(value) -> str:
    return number_text(value, digits=3, missing="-")


def arm_rows(arm: dict) -> dict[str, str]:
    """One arm as table cells, keyed by row label; round 1's stage-2 statistics (where pairs are made)."""
    first = arm["rounds"][0] if arm["rounds"] else {}
    rollout, dpo = first.get("rollout"), first.get("dpo")
    before, after = arm["before"], arm["after"]
    delta = after["accuracy"] - before["accuracy"] if before and after else None
    corrected = dotted(rollout, "correction.corrected")
    guessing = dotted(rollout, "correction.expected_by_guessing")
    cost = dotted(rollout, "cost") or {}
    per_pair = cost.get("per_pair") or {}
    per_correction = cost.get("per_correction_pair") or {}
    diagnostics = dotted(rollout, "pairs.diagnostics") or {}
    first_epoch = dotted(dpo, "heldout_after_first_epoch")
    dpo_seconds = dotted(dpo, "train_seconds")
    pairs = dotted(rollout, "pairs.pairs")
    return {
        "corrector": _num(dotted(rollout, "corrector.corrector"))
        + (f" ({dotted(rollout, 'corrector.backend')})" if dotted(rollout, "corrector.backend") else ""),
        "pairs level": _num(dotted(rollout, "pairs.level")),
        "CMExam accuracy before (SFT)": _pct(before and before["accuracy"]) + (f" (n={before['n']})" if before else ""),
        "CMExam accuracy after stage 2": _pct(after and after["accuracy"]),
        "accuracy change": "-" if delta is None else f"{100 * delta:+.1f} pp",
        "questions gained / lost": _movement(arm["graded_before"], arm["graded_after"]),
        "rollout pass@1 / pass@k": f"{_pct(dotted(rollout, 'rollout.pass@1'))} / {_pct(dotted(rollout, 'rollout.pass@k'))}",
        "corrections accepted / wrong trajectories": f"{_num(corrected)} / {_num(dotted(rollout, 'correction.wrong_trajectories'))}",
        # The analytic figure assumes independent uniform guesses: a lower bound. The placebo is measured on
        # the votes; its rewrites are assumed to follow as often as gold's (none is run from a stand-in).
        "of which chance explains (analytic lower bound – placebo, its rewrites not run)": "-"
        if guessing is None
        else f"{guessing:.2f}"
        + (f" – {placebo:.2f}" if (placebo := dotted(rollout, "correction.placebo.expected")) is not None else ""),
        "pairs (train + held-out)": _num(pairs),
        "chosen from a correction": _pct(diagnostics.get("from_correction_share")),
        "same final letters": _pct(diagnostics.get("same_letters_share")),
        "chosen / rejected tokens (median)": (
            f"{_num(dotted(diagnostics, 'chosen_tokens.median'))} / {_num(dotted(diagnostics, 'rejected_tokens.median'))}"
            if diagnostics.get("chosen_tokens")
            else f"{_num(dotted(diagnostics, 'chosen_chars.median'))} / {_num(dotted(diagnostics, 'rejected_chars.median'))} chars"
        ),
        "chosen/rejected length ratio (median)": _num(
            dotted(diagnostics, "tokens_ratio.median") or dotted(diagnostics, "chars_ratio.median")
        ),
        "held-out reward accuracy, 1st epoch": _pct(first_epoch and first_epoch["reward_accuracy"]),
        # Measured on pairs that did not pick the kept model (the reporting half), and said so.
        "held-out reward accuracy of the kept model": _pct(dotted(dpo, "heldout.reward_accuracy"))
        + (f" (on {dotted(dpo, 'heldout.measured_on')})" if dotted(dpo, "heldout.measured_on") else ""),
        "DPO model kept": f"{dotted(dpo, 'kept.model')}: {dotted(dpo, 'kept.why')}" if dotted(dpo, "kept") else "-",
        "DPO loss first → last (kept model's)": f"{_num(dotted(dpo, 'loss_first'))} → {_num(dotted(dpo, 'loss_last'))}"
        + (f" ({_num(dotted(dpo, 'kept.training_loss'))})" if dotted(dpo, "kept") else ""),
        "student tokens per pair": _num(per_pair.get("student_tokens")),
        "teacher tokens per pair": _num(per_pair.get("teacher_tokens")),
        f"rollout {cost.get('seconds', {}).get('device', 'device')}-seconds per pair": _num(
            per_pair.get("device_seconds")
        ),
        "DPO seconds per pair": _num(dpo_seconds / pairs if dpo_seconds and pairs else None),
        # Prices are the user's: the figure is an estimate, in the currency they were given in.
        f"money per pair (estimate{', ' + currency if (currency := dotted(cost, 'money.currency')) else ''})": _num(
            per_pair.get("money")
        )
        if "money" in per_pair
        else "not priced",
        # The arms' rollouts cost the same; what differs is the correction machinery, over the pairs whose
        # chosen answer is a correction (not a correct sample of the student's own).
        "pairs from a correction": _num(cost.get("pairs_from_corrections")),
        "student tokens per correction pair": _num(per_correction.get("student_tokens")),
        "teacher tokens per correction pair": _num(per_correction.get("teacher_tokens")),
        f"correction {cost.get('seconds', {}).get('device', 'device')}-seconds per correction pair": _num(
            per_correction.get("device_seconds")
        ),
        f"money per correction pair (estimate{', ' + currency if currency else ''})": (
            _num(per_correction.get("money")) if "money" in per_correction else "not priced" if per_correction else "-"
        ),
    }


def arm_table(arms: dict[str, dict]) -> str:
    """Markdown: one column per arm (name -> `load_arm` result), one row per measure."""
    columns = {name: arm_rows(arm) for name, arm in arms.items()}
    labels: list[str] = []
    for rows in columns.values():
        labels += [label for label in rows if label not in labels]
    lines = [
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {label} | " + " | ".join(rows.get(label, "-") for rows in columns.values()) + " |" for label in labels),
    ]
    names = list(arms)
    if len(names) == 2:
        a, b = (arms[n]["graded_after"] for n in names)
        if a and b:
            common = a.keys() & b.keys()
            only_a = sum(a[q] and not b[q] for q in common)
            only_b = sum(b[q] and not a[q] for q in common)
            verdict = (
                f"Final models on the same {len(common)} questions: {only_a} right only with {names[0]}, "
                f"{only_b} right only with {names[1]} (exact McNemar p={mcnemar_exact(only_a, only_b):.3g})."
            )
            lines += ["", verdict]
    return "\n".join(lines) + "\n"
