"""The run's report: the base, SFT and DPO models side by side, and what every step did."""

from __future__ import annotations

import json
from pathlib import Path

from medcritical import storage
from medcritical.analysis.plotting import figure
from medcritical.analysis.stats import paired_markdown, paired_table
from medcritical.core.stage import Input, Stage
from medcritical.core.values import dotted, number_text, percent
from medcritical.data.stage import PREPARE_DATA
from medcritical.distill.stage import DISTILL
from medcritical.errors import InputError
from medcritical.evaluation.compare import correct_by_id
from medcritical.evaluation.report import GRADED_JSONL, REPORT_JSON, REPORT_MD, dropped_note
from medcritical.orchestration.arms import arm_table
from medcritical.orchestration.recipe import Recipe, dump_recipe
from medcritical.orchestration.staging import stage_uri, work_dir
from medcritical.selfplay.stage import ROUND_KEYS, ROUNDS_FILE
from medcritical.selfplay.train_pass import TRAIN_PASS_STATS, train_pass_line
from medcritical.training.stage import SFT

PLOT = "models.png"


def _accuracy_cell(report: dict | None) -> str:
    if not report:
        return "not run"
    low, high = report["ci95"]
    # A judge protocol's unusable verdicts stand beside its accuracy, with the bounds they leave open.
    return (
        f"{percent(report['accuracy'])}% ({report['correct']}/{report['n']}{dropped_note(report)}; "
        f"95% CI {percent(low)}–{percent(high)})"
    )


def _numbers(stats: dict | None, keys: tuple[str, ...]) -> str:
    """`key=value` for the keys present; a dotted key reaches into nested statistics (pairs.train_pairs)."""
    if not stats:
        return "not run"
    if stats.get("status") == "skipped":
        return f"skipped ({stats.get('reason', 'no reason given')})"
    shown = []
    for key in keys:
        value = dotted(stats, key)
        if value is not None:
            # rollout.pass@1 -> pass@1, heldout.margin -> heldout_margin
            shown.append(f"{key.replace('heldout.', 'heldout_').rsplit('.', 1)[-1]}={number_text(value)}")
    return ", ".join(shown) or "-"


def _reused_note(source: str | None) -> str:
    return f" (reused from {source}: not run again in this run)" if source else ""


def _train_pass_cell(recipe: Recipe, round_stats: dict) -> str | None:
    """pass@1 on a round's training questions before → after DPO; why not, when the round's DPO trained and the
    recipe asks for it but nothing was measured (never left out without a word); None when not asked for."""
    measured, dpo = round_stats.get("train_pass"), round_stats.get("dpo")
    if measured and measured.get("status") == "not measured":
        return f"not measured ({measured.get('reason', 'no reason given')})"
    if measured:
        return train_pass_line(measured)
    if not dpo or dpo.get("status") == "skipped" or recipe.evaluate.train_pass_questions == 0:
        return None
    return (
        f"not measured (no {TRAIN_PASS_STATS} in the round's DPO folder: that DPO step predates the measurement "
        "or stopped before it; its log says why)"
    )


def _paired_section(paired: list[dict]) -> list[str]:
    if not paired:
        return []
    return [
        "Paired tests on the same questions (did the step move the answers? a difference whose interval "
        "holds 0, or McNemar p above 0.05, is not shown to be real):",
        "",
        *paired_markdown(paired),
        "",
    ]


def _format_table(evaluations: dict[str, dict | None]) -> list[str]:
    """Per model: the shares of outputs without a usable answer, the answers given, and the floor."""
    shown = {name: r["format"] for name, r in evaluations.items() if r and r.get("format")}
    if not shown:
        return []
    statuses = list(next(iter(shown.values()))["shares"])
    lines = [
        "Answer format (shares of outputs; a model near chance that leaves many empty or answers one letter "
        "has not learned the format):",
        "",
        "| model | " + " | ".join(f"{s} %" for s in statuses) + " | hit token limit % | most given answers | gold |",
        "|---|" + "---:|" * (len(statuses) + 1) + "---|---|",
    ]
    for name, d in shown.items():
        top = ", ".join(f"{k} {v}" for k, v in list(d["predicted"].items())[:3])
        gold = ", ".join(f"{k} {v}" for k, v in list(d["gold"].items())[:3])
        lines.append(
            f"| {name} | "
            + " | ".join(percent(d["shares"][s]) for s in statuses)
            + f" | {percent(d['hit_token_limit'])} | {top} | {gold} |"
        )
    best = next(iter(shown.values()))["best_constant"]
    lines += ["", f"Always answering {best['answer']} would score {percent(best['accuracy'])}%.", ""]
    return lines


def plot_models(evaluations: dict[str, dict | None], path: Path) -> None:
    names = [name for name, report in evaluations.items() if report]
    reports = [evaluations[name] for name in names]
    values = [r["accuracy"] for r in reports]
    errors = [[v - r["ci95"][0] for v, r in zip(values, reports)], [r["ci95"][1] - v for v, r in zip(values, reports)]]
    protocol = reports[0]["protocol"] if reports else "mcq"
    with figure(path, size=(5, 3.2)) as (_, ax):
        ax.bar(names, values, yerr=errors, capsize=5, color=["#8C8C8C", "#4C72B0", "#55A868"][: len(names)])
        for x, (v, r) in enumerate(zip(values, reports)):  # the percentage above the CI bar
            ax.text(x, r["ci95"][1] + 0.02, f"{percent(v)}%", ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"CMExam accuracy ({protocol}), 95% CI")
        ax.set_title("MedCritical: base → SFT → DPO", fontsize=10)


def stage2_section(recipe: Recipe, evaluations: dict[str, dict | None], stats: dict) -> list[str]:
    """Stage 2 in numbers: corrector, accepted corrections against guessing, pair diagnostics and cost per
    pair (the same table `medcritical arms` puts side by side for several runs)."""

    if not any(r.get("rollout") for r in stats.get("rounds", [])):
        return []
    arm = {
        "before": evaluations.get("sft"),
        "after": evaluations.get("dpo"),
        "graded_before": None,
        "graded_after": None,
        "rounds": stats["rounds"],
    }
    return ["", "## Stage 2: corrections, pairs and cost (round 1)", "", arm_table({recipe.run.name: arm}).rstrip()]


def write_run_report(
    recipe: Recipe,
    evaluations: dict[str, dict | None],
    stats: dict,
    output_dir: Path,
    correct_by_model: dict[str, dict[str, bool] | None] | None = None,
    reused: dict[str, str] | None = None,
) -> dict:
    """Write report.md, report.json and models.png; return the headline numbers and the Markdown.

    `correct_by_model` (per-question correctness of each evaluation) adds the paired tests; `reused` names the
    earlier run's folder of a stage this run did not run again (the distillation, with distill_uri)."""
    reused = reused or {}
    protocols = {r["protocol"] for r in evaluations.values() if r}
    if len(protocols) > 1:  # never mix protocols in one comparison
        raise InputError(f"the evaluations used different protocols {sorted(protocols)}; evaluate all models alike")
    protocol = protocols.pop() if protocols else recipe.evaluate.protocol
    n_eval = next((r["n"] for r in evaluations.values() if r), 0)
    paired = paired_table({name: c for name, c in (correct_by_model or {}).items() if c})
    lines = [
        f"# MedCritical run `{recipe.run.name}`",
        "",
        f"CMExam accuracy, protocol **`{protocol}`**, {n_eval} evaluation questions, model `{recipe.model.base}`:",
        "",
        f"| model | accuracy ({protocol}) |",
        "|---|---|",
        *(f"| {name} | {_accuracy_cell(report)} |" for name, report in evaluations.items()),
        "",
        *_format_table(evaluations),
        *_paired_section(paired),
        "## Steps",
        "",
        f"- data: {_numbers(stats.get('data'), ('train', 'eval', 'train_multi_answer'))}"
        f"{'; bad rows: ' + str(len(stats['data']['bad_rows'])) if stats.get('data') else ''}",
        f"- distill: {_numbers(stats.get('distill'), ('questions', 'accepted', 'acceptance_rate', 'trace_attempts'))}"
        f"{_reused_note(reused.get('distill'))}",
        f"- sft: {_numbers(stats.get('sft'), ('examples', 'steps', 'loss_first', 'loss_last', 'tokens_per_second', 'train_seconds'))}",
    ]
    for number, round_stats in enumerate(stats.get("rounds", []), start=1):
        lines.append(
            f"- round {number} rollout: {_numbers(round_stats.get('rollout'), ('rollout.questions', 'rollout.pass@1', 'rollout.pass@k', 'format.shares.empty', 'format.shares.truncated', 'correction.wrong_trajectories', 'correction.corrected', 'pairs.train_pairs', 'pairs.heldout_pairs'))}"
        )
        lines.append(
            f"- round {number} dpo: {_numbers(round_stats.get('dpo'), ('train_pairs', 'steps', 'loss_first', 'loss_last', 'heldout.reward_accuracy', 'heldout.margin', 'kept.model', 'stopped_early'))}"
        )
        if (measured := _train_pass_cell(recipe, round_stats)) is not None:
            lines.append(f"- round {number} training questions' pass@1 before → after DPO: {measured}")
    lines += stage2_section(recipe, evaluations, stats)
    lines += ["", f"![accuracy by model]({PLOT})", ""]
    markdown = "\n".join(lines)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_MD).write_text(markdown, encoding="utf-8")
    (output_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    summary = {
        "protocol": protocol,
        **{f"accuracy_{name}": report["accuracy"] for name, report in evaluations.items() if report},
        "evaluations": evaluations,
        "paired": paired,
        "steps": stats,
        **({"reused": reused} if reused else {}),
    }
    (output_dir / REPORT_JSON).write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    plot_models(evaluations, output_dir / PLOT)
    return {
        "protocol": protocol,
        **{f"accuracy_{name}": report["accuracy"] for name, report in evaluations.items() if report},
        "markdown": markdown,
    }


def read_run_statistics(
    recipe: Recipe,
    distill_stats: Path | None = None,
    data_stats: Path | None = None,
    sft_stats: Path | None = None,
    rounds: Path | None = None,
) -> dict:
    """Every stage's statistics, from the report's declared inputs: the data, distillation (an earlier run's when
    its traces were reused) and SFT statistics, and the rounds file of the last round's DPO (see
    `round_statistics`)."""
    return {
        "data": _json(data_stats),
        "distill": _json(distill_stats),
        "sft": _json(sft_stats),
        "rounds": round_statistics(recipe, rounds),
    }


def _json(path: Path | None) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path else None


def round_statistics(recipe: Recipe, rounds: Path | None) -> list[dict]:
    """Each round's rollout, DPO and pass@1-after-DPO statistics: the list the last round's DPO wrote (ROUNDS_FILE,
    built along the rounds' chain), one entry per round that ran. The recipe's rounds it does not reach (an early
    stop, no rounds input) read as "not run"."""
    ran = _json(rounds) or []
    if not isinstance(ran, list):
        raise InputError(f"{rounds}: not a list of rounds; give the last self-play round's DPO folder as rounds")
    return ran + [dict.fromkeys(ROUND_KEYS) for _ in range(recipe.selfplay.rounds - len(ran))]


def input_source(path: Path) -> str:
    """The URI a local input path came from: an s3:// input is downloaded to <work>/in/<hash>/<bucket>/<key>."""
    downloads = (work_dir() / "in").resolve()
    resolved = path.resolve()
    if resolved.is_relative_to(downloads) and len(parts := resolved.relative_to(downloads).parts) > 2:
        return "s3://" + "/".join(parts[1:])
    return str(path)


def reused_from(recipe: Recipe, stage: Stage, stats: Path | None) -> str | None:
    """The folder whose statistics of `stage` the report was given, when it is not this run's own folder of that
    stage: an earlier run's distillation reused (the pipeline's distill_uri)."""
    if stats is None:
        return None
    source = input_source(stats).rpartition("/")[0]
    own = stage_uri(recipe.run.root, stage)
    if storage.is_s3(own) or storage.is_s3(source):
        return None if source.rstrip("/") == own.rstrip("/") else source
    return None if Path(source).resolve() == Path(own).resolve() else source


MODELS = ("base", "sft", "dpo")


def _run(
    recipe: Recipe,
    output_dir: Path,
    *,
    distill: Path | None,
    data: Path | None,
    sft: Path | None,
    rounds: Path | None,
    **evaluated: Path | None,
) -> dict:
    evaluations = {
        name: json.loads(path.read_text(encoding="utf-8")) if (path := evaluated[f"{name}_eval"]) else None
        for name in MODELS
    }
    # Each evaluation's graded answers (for the paired tests), declared beside its report.json.
    correct = {name: correct_by_id(path) for name in MODELS if (path := evaluated[f"{name}_graded"])}
    statistics = read_run_statistics(recipe, distill, data, sft, rounds)
    reused = {"distill": source} if (source := reused_from(recipe, DISTILL, distill)) else {}
    return write_run_report(recipe, evaluations, statistics, output_dir, correct_by_model=correct, reused=reused)


# The evaluations of the base, SFT and final models with their graded answers, the data, distillation (an earlier
# run's when its traces were reused) and SFT statistics, and every round's statistics: the rounds file of the last
# round's DPO folder (round<R>-dpo, R the last round that ran, as the final model's evaluation eval-dpo-round<R>).
REPORT = Stage(
    name="report",
    folder="report",
    section="run",
    run=_run,
    inputs={
        **{f"{model}_eval": Input(REPORT_JSON, optional=True) for model in MODELS},
        **{f"{model}_graded": Input(GRADED_JSONL, beside=f"{model}_eval", optional=True) for model in MODELS},
        "distill": Input(DISTILL.stats, default_stage="distill", optional=True),
        "data": Input(PREPARE_DATA.stats, default_stage="prepare_data", optional=True),
        "sft": Input(SFT.stats, default_stage="sft", optional=True),
        # No default: which round is the last depends on the run (an early stop), as for dpo_eval.
        "rounds": Input(ROUNDS_FILE, optional=True),
    },
    outputs=(REPORT_MD, REPORT_JSON, "recipe.yaml", PLOT),
    stats=REPORT_JSON,
    fingerprint=None,  # rebuilt from the stages' outputs every run
    produces="metrics",
)
