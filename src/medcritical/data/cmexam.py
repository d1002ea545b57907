"""CMExam questions: one schema, three file formats, bad rows reported and counted, never dropped silently.

Formats:
- the official CSV (``Question, Options, Answer, Explanation`` plus, in the test split, five
  annotation columns), options one per line as ``"A text"``;
- the XLSX export (same columns; options separated by a *literal* backslash-n);
- JSONL in the canonical schema below (what every step of this project writes and reads).

Canonical row: ``{"id": "12", "question": "...", "options": {"A": "...", ...}, "answer": "AC",
"explanation": "...", "annotations": {"Difficulty level": "..."}}``. A question's id is its ``id``
column, or else its 0-based data-row number in the file.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

from medcritical.errors import UserError

# Columns of the official files; any other non-empty column is kept as an annotation.
QUESTION, OPTIONS, ANSWER, EXPLANATION, ID = "Question", "Options", "Answer", "Explanation", "id"
ANNOTATION_COLUMNS = (
    "Disease Group",
    "Clinical Department",
    "Medical Discipline",
    "Competency",
    "Difficulty level",
)

_OPTION_LINE = re.compile(r"^\s*([A-Z])\s*[.、．:：)）]?\s*(.*?)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: dict[str, str]  # letter -> text, in letter order
    answer: str  # gold letters, sorted, e.g. "C" or "ACD"
    explanation: str = ""
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def is_multi_answer(self) -> bool:
        return len(self.answer) > 1

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BadRow:
    file: str
    row: int  # 0-based data row (the header is not a row)
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}: {self.reason}"


class DataError(UserError, ValueError):
    """Input data that cannot be used as it is; the message names file, row and fix."""


@dataclass
class LoadResult:
    questions: list[Question]
    bad_rows: list[BadRow]
    source: str

    @property
    def summary(self) -> dict:
        return {"source": self.source, "loaded": len(self.questions), "bad_rows": len(self.bad_rows)}


def parse_options(cell: str) -> dict[str, str]:
    """``"A 原发病\\nB 出血部位"`` (real or literal backslash-n) → ``{"A": "原发病", "B": "出血部位"}``."""
    options: dict[str, str] = {}
    for line in str(cell).replace("\\n", "\n").split("\n"):
        if not line.strip():
            continue
        match = _OPTION_LINE.match(line)
        if match is None or match.group(1) in options:
            # A continuation of the previous option's text (rare in exports): keep it, don't lose it.
            if options:
                last = next(reversed(options))
                options[last] = f"{options[last]} {line.strip()}"
                continue
            raise ValueError(f"option line {line.strip()!r} does not start with a letter")
        options[match.group(1)] = match.group(2)
    return dict(sorted(options.items()))


def parse_answer(cell) -> str:
    """``"AC"``, ``"A,C"``, ``["A", "C"]`` → ``"AC"`` (sorted, unique)."""
    if isinstance(cell, (list, tuple)):
        cell = "".join(map(str, cell))
    return "".join(sorted(set(re.findall(r"[A-Z]", str(cell or "").upper()))))


def _row_to_question(row: dict, row_number: int) -> Question:
    """Build a Question from a file row in any format; raises ValueError naming the problem."""
    question = str(row.get("question") or row.get(QUESTION) or "").strip()
    if not question:
        raise ValueError("empty question")
    raw_options = row.get("options", row.get(OPTIONS))
    if isinstance(raw_options, dict):
        options = {str(k).strip().upper(): str(v).strip() for k, v in raw_options.items()}
    else:
        options = parse_options(raw_options or "")
    if not options:
        raise ValueError("no options")
    answer = parse_answer(row.get("answer", row.get(ANSWER)))
    if not answer:
        raise ValueError("no answer letter")
    missing = sorted(set(answer) - set(options))
    if missing:
        raise ValueError(
            f"answer letter(s) {''.join(missing)} not among options {''.join(options)}"
        )
    known = {"id", "question", "options", "answer", "explanation", "annotations"}
    known |= {QUESTION, OPTIONS, ANSWER, EXPLANATION}
    annotations = dict(row.get("annotations") or {})
    annotations |= {k: str(v).strip() for k, v in row.items() if k not in known and v not in (None, "")}
    row_id = row.get("id", row.get(ID))
    return Question(
        id=str(row_id).strip() if row_id not in (None, "") else str(row_number),
        question=question,
        options=options,
        answer=answer,
        explanation=str(row.get("explanation") or row.get(EXPLANATION) or "").strip(),
        annotations=annotations,
    )


def _read_rows(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_number} is not valid JSON ({e.msg})") from e
    elif suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            yield from csv.DictReader(f)
    elif suffix in (".xlsx", ".xlsm"):
        import openpyxl

        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            rows = workbook.worksheets[0].iter_rows(values_only=True)
            header = [str(h).strip() if h is not None else "" for h in next(rows)]
            for values in rows:
                if all(v is None for v in values):
                    continue
                yield {h: v for h, v in zip(header, values) if h}
        finally:
            workbook.close()
    else:
        raise DataError(
            f"{path}: unknown data format {suffix!r}; use the official .csv, the .xlsx export or .jsonl"
        )


def load_questions(path: str | Path, on_bad_row: Literal["skip", "error"] = "skip") -> LoadResult:
    """Load CMExam questions from CSV, XLSX or JSONL.

    Bad rows (empty question, no options, answer not among options, duplicate id) are collected
    with file, row and reason; with ``on_bad_row="error"`` the first one raises `DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file; check the recipe's data.* paths")
    questions: list[Question] = []
    bad_rows: list[BadRow] = []
    seen_ids: set[str] = set()
    for row_number, row in enumerate(_read_rows(path)):
        try:
            question = _row_to_question(row, row_number)
            if question.id in seen_ids:
                raise ValueError(f"duplicate id {question.id!r}")
        except ValueError as e:
            bad = BadRow(str(path), row_number, str(e))
            if on_bad_row == "error":
                raise DataError(
                    f"{bad}. Fix the row, or set data.on_bad_row: skip to skip and count bad rows."
                ) from e
            bad_rows.append(bad)
            continue
        seen_ids.add(question.id)
        questions.append(question)
    if not questions:
        raise DataError(f"{path}: no usable question ({len(bad_rows)} bad rows; first: {bad_rows[:1]})")
    return LoadResult(questions, bad_rows, str(path))


def write_questions(questions: Iterable[Question], path: str | Path) -> int:
    """Write questions as canonical JSONL; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for question in questions:
            f.write(json.dumps(question.to_json(), ensure_ascii=False) + "\n")
            count += 1
    return count
