"""Evaluation outputs: report.json, report.md, accuracy.png and graded.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from medcritical.analysis.diagnostics import diagnostics_line
from medcritical.analysis.plotting import figure
from medcritical.core.values import percent
from medcritical.io.jsonl import write_jsonl

REPORT_JSON, REPORT_MD, PLOT_PNG, GRADED_JSONL = "report.json", "report.md", "accuracy.png", "graded.jsonl"
MAX_BARS_PER_COLUMN = 12  # annotation columns can have dozens of values; show the largest groups

PROTOCOL_TITLES = {
    "mcq": "standard MCQ: options shown, answer letters extracted, exact letter-set match",
    "judge-paper": "SP-Huatuo's open-ended judge: no options, raw prompt, sampled student (T 0.7, top-p 0.9, "
    "450 tokens); a judge answers 1 (correct) or 2 (wrong); judge errors dropped from the denominator",
    "judge-rubric": "rubric judge: no options, greedy student; a judge with the reference and the expert "
    "explanation ends with a strict verdict line; judge errors dropped from the denominator",
}


def dropped_note(report: dict) -> str:
    """ "; 3 of 100 dropped: no verdict, bounds 41.0–44.0%" beside a judge protocol's accuracy ("" when
    none were dropped): the bounds count every dropped verdict wrong, then right."""
    if not report.get("dropped"):
        return ""
    note = f"; {report['dropped']} of {report['questions']} dropped: no verdict"
    bounds = report.get("bounds")
    if bounds:
        note += f", bounds {percent(bounds['drops_as_wrong'])}–{percent(bounds['drops_as_right'])}%"
    return note


def markdown_report(report: dict) -> str:
    protocol = report["protocol"]
    lines = [
        f"# CMExam evaluation — protocol `{protocol}`",
        "",
        f"Protocol: {PROTOCOL_TITLES[protocol]}.",
        f"Model: `{report.get('model', '-')}`; dataset: `{report.get('dataset', '-')}`; "
        f"scoring: {report.get('scoring', '-')}.",
        "",
        f"**Accuracy ({protocol}): {percent(report['accuracy'])}%** "
        f"({report['correct']}/{report['n']}{dropped_note(report)}; 95% CI {percent(report['ci95'][0])}–{percent(report['ci95'][1])}%)",
        "",
    ]
    if report.get("format"):
        lines += [f"Format ({protocol}): {diagnostics_line(report['format'])}.", ""]
    if report.get("missing_predictions"):
        lines.append(f"- {len(report['missing_predictions'])} questions had no prediction (counted wrong).")
    if report.get("unknown_ids"):
        lines.append(f"- {len(report['unknown_ids'])} predictions named ids not in the dataset (ignored).")
    if report.get("format"):
        lines += format_section(report["format"], protocol)
    for column, values in report["by"].items():
        lines += [
            "",
            f"## By {column} ({protocol})",
            "",
            "| group | n | accuracy % | 95% CI % |",
            "|---|---:|---:|---:|",
        ]
        for value, cell in values.items():
            lines.append(
                f"| {value} | {cell['n']} | {percent(cell['accuracy'])} | "
                f"{percent(cell['ci95'][0])}–{percent(cell['ci95'][1])} |"
            )
    return "\n".join(lines) + "\n"


def format_section(diagnostics: dict, protocol: str) -> list[str]:
    """The status shares and the answers given beside the gold answers, as Markdown tables."""
    n = diagnostics["n"] or 1
    lines = ["", f"## Answer format ({protocol})", "", "| status | n | share % |", "|---|---:|---:|"]
    lines += [
        f"| {status} | {diagnostics['counts'][status]} | {percent(diagnostics['shares'][status])} |"
        for status in diagnostics["counts"]
    ]
    lines.append(f"| (hit the token limit, any status) | | {percent(diagnostics['hit_token_limit'])} |")
    answers = list(dict.fromkeys([*diagnostics["gold"], *diagnostics["predicted"]]))
    lines += ["", "| answer | predicted | gold |", "|---|---:|---:|"]
    lines += [
        f"| {answer} | {diagnostics['predicted'].get(answer, 0)} | {diagnostics['gold'].get(answer, 0)} |"
        for answer in sorted(
            answers, key=lambda a: -(diagnostics["predicted"].get(a, 0) + diagnostics["gold"].get(a, 0))
        )
    ]
    best = diagnostics["best_constant"]
    lines += [
        "",
        f"Always answering {best['answer'] or '-'} would score {percent(best['accuracy'])}% "
        f"({round(best['accuracy'] * n)}/{diagnostics['n']}).",
        "",
    ]
    return lines


def plot_accuracy(report: dict, path: Path) -> None:
    """Bar chart of accuracy by category with 95% CI whiskers."""
    labels, values, lows, highs = ["overall"], [report["accuracy"]], [report["ci95"][0]], [report["ci95"][1]]
    for column, groups in report["by"].items():
        largest = sorted(groups.items(), key=lambda kv: -kv[1]["n"])[:MAX_BARS_PER_COLUMN]
        for value, cell in largest:
            labels.append(f"{column}={value} (n={cell['n']})")
            values.append(cell["accuracy"])
            lows.append(cell["ci95"][0])
            highs.append(cell["ci95"][1])
    errors = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
    with figure(path, size=(7, 0.45 * len(labels) + 1.5)) as (_, ax):
        ax.barh(range(len(labels)), values, xerr=errors, color="#4C72B0", capsize=3)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"accuracy (protocol: {report['protocol']}), 95% CI")
        ax.set_title(f"CMExam accuracy — {report.get('label') or report.get('model', '')}", fontsize=10)


def write_report(report: dict, graded: list[dict], output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_JSON).write_text(json.dumps(report, ensure_ascii=False, indent=2))
    (output_dir / REPORT_MD).write_text(markdown_report(report), encoding="utf-8")
    write_jsonl(graded, output_dir / GRADED_JSONL)
    plot_accuracy(report, output_dir / PLOT_PNG)
    return output_dir / REPORT_JSON
