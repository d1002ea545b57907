"""`medcritical compare`: the paired tests between two evaluation folders, or two run folders."""

from __future__ import annotations

import json
from pathlib import Path

from medcritical.analysis.stats import paired_comparison, paired_markdown
from medcritical.errors import InputError, MissingInputError
from medcritical.evaluation.report import GRADED_JSONL, REPORT_JSON
from medcritical.io.jsonl import read_jsonl


def correct_by_id(evaluation: str | Path) -> dict[str, bool]:
    """Per-question correctness of one evaluation: its graded.jsonl, or the folder holding it. A question
    whose judge verdict was unusable (`dropped`) is left out, as report.json leaves it out of the accuracy:
    every paired test, `compare` and `arms` read correctness here."""
    path = Path(evaluation)
    rows = read_jsonl(path / GRADED_JSONL if path.is_dir() else path)
    return {str(row["id"]): bool(row["correct"]) for row in rows if not row.get("dropped")}


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


def _same_questions(x: Path, y: Path) -> None:
    """Refuse two evaluations of different questions or different gold answers: a paired test over them
    would compare nothing. Their fingerprints' question hashes must agree (when both have one), every
    question both graded must have the same gold answer, and without fingerprints the question sets must
    be the same."""
    prints = [_fingerprint(p).get("questions") for p in (x, y)]
    if all(prints) and prints[0] != prints[1]:
        raise InputError(
            f"{x} and {y} evaluated different questions (question hashes {prints[0][:12]} vs {prints[1][:12]}); "
            "compare evaluations of the same question file"
        )
    gold = [{str(r["id"]): r.get("gold") for r in read_jsonl(p / GRADED_JSONL)} for p in (x, y)]
    differing = sorted(i for i in gold[0].keys() & gold[1].keys() if gold[0][i] != gold[1][i])
    if differing:
        i = differing[0]
        raise InputError(
            f"{x} and {y} have different gold answers for {len(differing)} questions (id {i!r}: {gold[0][i]!r} vs "
            f"{gold[1][i]!r}); compare evaluations of the same question file"
        )
    if not any(prints) and gold[0].keys() != gold[1].keys():
        only = sorted(gold[0].keys() ^ gold[1].keys())
        raise InputError(
            f"{x} and {y} graded different questions ({len(only)} ids in only one, e.g. {only[0]!r}); compare "
            "evaluations of the same question file"
        )


def _fingerprint(path: Path) -> dict:
    try:
        record = json.loads((path / "fingerprint.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


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
        _same_questions(x, y)
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
