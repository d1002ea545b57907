"""The run's report: the base, SFT and DPO models side by side, and what every step did."""

from __future__ import annotations

import json
from pathlib import Path

from medcritical.evaluation.report import percent
from medcritical.recipe import Recipe, dump_recipe

PLOT = "models.png"


def _accuracy_cell(report: dict | None) -> str:
    if not report:
        return "not run"
    low, high = report["ci95"]
    return f"{percent(report['accuracy'])}% ({report['correct']}/{report['n']}; 95% CI {percent(low)}–{percent(high)})"


def _lookup(stats: dict, dotted: str):
    value = stats
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _numbers(stats: dict | None, keys: tuple[str, ...]) -> str:
    """`key=value` for the keys present; a dotted key reaches into nested statistics (pairs.train_pairs)."""
    if not stats:
        return "not run"
    if stats.get("status") == "skipped":
        return f"skipped ({stats.get('reason', 'no reason given')})"
    shown = []
    for key in keys:
        value = _lookup(stats, key)
        if isinstance(value, float):
            value = f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        if value is not None:
            # rollout.pass@1 -> pass@1, heldout.margin -> heldout_margin
            shown.append(f"{key.replace('heldout.', 'heldout_').rsplit('.', 1)[-1]}={value}")
    return ", ".join(shown) or "-"


def plot_models(evaluations: dict[str, dict | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, report in evaluations.items() if report]
    reports = [evaluations[name] for name in names]
    values = [r["accuracy"] for r in reports]
    errors = [[v - r["ci95"][0] for v, r in zip(values, reports)], [r["ci95"][1] - v for v, r in zip(values, reports)]]
    protocol = reports[0]["protocol"] if reports else "mcq"
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, values, yerr=errors, capsize=5, color=["#8C8C8C", "#4C72B0", "#55A868"][: len(names)])
    for x, (v, r) in enumerate(zip(values, reports)):
        ax.text(x, r["ci95"][1] + 0.02, f"{100 * v:.1f}%", ha="center", va="bottom", fontsize=9)  # above the CI bar
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"CMExam accuracy ({protocol}), 95% CI")
    ax.set_title("MedCritical: base → SFT → DPO", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage2_section(recipe: Recipe, evaluations: dict[str, dict | None], stats: dict) -> list[str]:
    """Stage 2 in numbers: corrector, accepted corrections against guessing, pair diagnostics and cost per
    pair (the same table `medcritical arms` puts side by side for several runs)."""
    from medcritical.selfplay.arms import arm_table

    if not any(r.get("rollout") for r in stats.get("rounds", [])):
        return []
    arm = {"before": evaluations.get("sft"), "after": evaluations.get("dpo"), "graded_before": None, "graded_after": None,
           "rounds": stats["rounds"]}
    return ["", "## Stage 2: corrections, pairs and cost (round 1)", "", arm_table({recipe.run.name: arm}).rstrip()]


def write_run_report(recipe: Recipe, evaluations: dict[str, dict | None], stats: dict, output_dir: Path) -> dict:
    """Write report.md, report.json and models.png; return the headline numbers and the Markdown."""
    protocols = {r["protocol"] for r in evaluations.values() if r}
    if len(protocols) > 1:  # never mix protocols in one comparison
        raise ValueError(f"the evaluations used different protocols {sorted(protocols)}; evaluate all models alike")
    protocol = protocols.pop() if protocols else recipe.evaluate.protocol
    n_eval = next((r["n"] for r in evaluations.values() if r), 0)
    lines = [
        f"# MedCritical run `{recipe.run.name}`",
        "",
        f"CMExam accuracy, protocol **`{protocol}`**, {n_eval} evaluation questions, model `{recipe.model.base}`:",
        "",
        f"| model | accuracy ({protocol}) |",
        "|---|---|",
        *(f"| {name} | {_accuracy_cell(report)} |" for name, report in evaluations.items()),
        "",
        "## Steps",
        "",
        f"- data: {_numbers(stats.get('data'), ('train', 'eval', 'train_multi_answer'))}"
        f"{'; bad rows: ' + str(len(stats['data']['bad_rows'])) if stats.get('data') else ''}",
        f"- distill: {_numbers(stats.get('distill'), ('questions', 'accepted', 'acceptance_rate', 'trace_attempts'))}",
        f"- sft: {_numbers(stats.get('sft'), ('examples', 'steps', 'loss_first', 'loss_last', 'tokens_per_second', 'train_seconds'))}",
    ]
    for number, round_stats in enumerate(stats.get("rounds", []), start=1):
        lines.append(
            f"- round {number} rollout: {_numbers(round_stats.get('rollout'), ('rollout.questions', 'rollout.pass@1', 'rollout.pass@k', 'correction.wrong_trajectories', 'correction.corrected', 'pairs.train_pairs', 'pairs.heldout_pairs'))}"
        )
        lines.append(
            f"- round {number} dpo: {_numbers(round_stats.get('dpo'), ('train_pairs', 'steps', 'loss_first', 'loss_last', 'heldout.reward_accuracy', 'heldout.margin', 'stopped_early'))}"
        )
    lines += stage2_section(recipe, evaluations, stats)
    lines += ["", f"![accuracy by model]({PLOT})", ""]
    markdown = "\n".join(lines)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.md").write_text(markdown, encoding="utf-8")
    (output_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    summary = {
        "protocol": protocol,
        **{f"accuracy_{name}": report["accuracy"] for name, report in evaluations.items() if report},
        "evaluations": evaluations,
        "steps": stats,
    }
    (output_dir / "report.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    plot_models(evaluations, output_dir / PLOT)
    return {
        "protocol": protocol,
        **{f"accuracy_{name}": report["accuracy"] for name, report in evaluations.items() if report},
        "markdown": markdown,
    }
