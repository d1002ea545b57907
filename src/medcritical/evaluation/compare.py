"""`medcritical compare`: the paired tests between two evaluation folders, or two run folders."""

from __future__ import annotations

import json
from pathlib import Path

from medcritical.errors import InputError, MissingInputError
from medcritical.evaluation.report import GRADED_JSONL, REPORT_JSON
from medcritical.io.jsonl import read_jsonl
from medcritical.stats import paired_comparison, paired_markdown


def correct_by_id(evaluation: str | Path) -> dict[str, bool]:
    """Per-question correctness of one evaluation: its graded.jsonl, or the folder holding it."""
    path = Path(evaluation)
    return {str(row["id"]): bool(row["correct"]) for row in read_jsonl(path / GRADED_JSONL if path.is_dir() else path)}


def _is_evaluation(path: Path) -> bool:
    return (path / GRADED_JSONL).is_file() and (path / REPORT_JSON).is_file()


def evaluations_in(folder: str | Path) -> dict[str, Path]:
    """{name: evaluation folder}: the folder itself, or a run folder's eval-* step folders."""
    folder = Path(folder)
    if _is_evaluation(folder):
        return {folder.name: folder}
    found = {p.name: p for p in sorted(folder.glob("eval-*")) if _is_evaluation(p)}
    if not found:
        raise MissingInputError(
            f"{folder}: neither an evaluation folder ({GRADED_JSONL} and {REPORT_JSON}) nor a run folder with eval-* evaluations"
        )
    return found


def _protocol(path: Path) -> str:
    report = json.loads((path / REPORT_JSON).read_text(encoding="utf-8"))
    return f"{report['protocol']} ({report.get('scoring', '-')})"


def compare(first: str | Path, second: str | Path) -> list[dict]:
    """Paired comparisons of `first` against `second`: one for two evaluation folders; for two run
    folders, one per evaluation both runs hold (eval-base, eval-sft, ...)."""
    a, b = evaluations_in(first), evaluations_in(second)
    if len(a) == 1 and len(b) == 1:
        pairs = [(next(iter(a.values())), next(iter(b.values())))]
    else:
        pairs = [(a[name], b[name]) for name in a if name in b]
        if not pairs:
            raise InputError(f"{first} and {second} hold no evaluation of the same name ({sorted(a)} vs {sorted(b)})")
    rows = []
    for x, y in pairs:
        if _protocol(x) != _protocol(y):
            raise InputError(
                f"{x} ({_protocol(x)}) and {y} ({_protocol(y)}) used different protocols; numbers of different protocols are never compared"
            )
        rows.append(
            {
                "first": str(x),
                "second": str(y),
                "protocol": _protocol(x),
                **paired_comparison(correct_by_id(x), correct_by_id(y)),
            }
        )
    return rows


def compare_markdown(rows: list[dict]) -> str:
    lines = [f"Paired comparison, protocol {rows[0]['protocol']} (difference = second - first):", ""] if rows else []
    lines += paired_markdown(rows)
    unpaired = sum(r["unpaired_questions"] for r in rows)
    if unpaired:
        lines += ["", f"{unpaired} questions graded in only one of the two were left out of the pairing."]
    return "\n".join(lines)
