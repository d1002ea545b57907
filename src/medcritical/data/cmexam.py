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

import codecs
import csv
import json
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from medcritical.errors import UserError
from medcritical.io.jsonl import write_jsonl

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
    row: int  # 1-based, as an editor counts: the line of a text file, the sheet row of a workbook
    reason: str
    unit: str = "line"  # "line" (JSONL, CSV: where the record starts) or "row" (a workbook)

    def __str__(self) -> str:
        return f"{self.file}: {self.unit} {self.row}: {self.reason}"


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
    for canonical, official in (("question", QUESTION), ("options", OPTIONS), ("answer", ANSWER)):
        if canonical not in row and official not in row:
            raise ValueError(f"no {canonical!r} field (the {official} column)")
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
        raise ValueError(f"answer letter(s) {''.join(missing)} not among options {''.join(options)}")
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


# Encodings Chinese exam files come in besides UTF-8, tried in this order to name a file's encoding.
_GUESSES = ("gb18030", "big5", "shift_jis")
_REQUIRED = ((QUESTION, "question"), (OPTIONS, "options"), (ANSWER, "answer"))


def _guess_encoding(data: bytes) -> str | None:
    for bom, name in ((codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):
            return name
    for name in _GUESSES:
        try:
            data.decode(name)
            return name.upper()
        except UnicodeDecodeError:
            continue
    return None


def _text_lines(path: Path) -> tuple[list[str], dict[int, str]]:
    """The file's lines (ends kept) and, by 1-based line number, why a line is not UTF-8.

    A file in another encoding (most lines with non-ASCII bytes fail) is a `DataError` naming the
    encoding it looks like and how to convert it; a few stray bytes only make their lines bad rows.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines(keepends=True), {}
    except UnicodeDecodeError:
        pass
    lines, bad, non_ascii = [], {}, 0
    for number, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).splitlines(keepends=True), start=1):
        non_ascii += not raw.isascii()
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad[number] = (
                f"line {number} is not UTF-8 (byte {e.object[e.start : e.start + 1]!r} at column {e.start + 1})"
            )
            lines.append(raw.decode("utf-8", errors="replace"))
    if len(bad) * 2 >= non_ascii:
        first = min(bad)
        encoding = _guess_encoding(data)
        looks = f"it looks like {encoding}" if encoding else "its encoding could not be guessed"
        converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
        raise DataError(
            f"{path}: not UTF-8 text ({len(bad)} of {non_ascii} lines with non-ASCII bytes fail, first: "
            f"{bad[first]}); {looks}: convert it with `iconv -f {encoding or '<encoding>'} -t UTF-8 {path} > "
            f"{converted}` and use the new file"
        )
    return lines, bad


def _check_columns(path: Path, header: list[str]) -> None:
    missing = [official for official, canonical in _REQUIRED if official not in header and canonical not in header]
    if missing:
        found = ", ".join(repr(h) for h in header if h) or "none"
        raise DataError(
            f"{path}: no {' or '.join(repr(m) for m in missing)} column (found: {found}); CMExam files have the "
            "columns Question, Options, Answer and Explanation: rename the column in the header"
        )


def _read_rows(path: Path) -> Iterator[tuple[dict, str | None, int]]:
    """(row, problem, number) for each data row; `problem` names what makes the row unreadable (bytes
    that are not UTF-8, a JSON line that is not an object); `number` is its 1-based line (text) or
    sheet row (workbook)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        lines, bad = _text_lines(path)
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if line_number in bad:
                yield {}, f"{bad[line_number]}; fix the bytes or delete the line", line_number
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {line_number} is not valid JSON ({e.msg}); fix or delete that line"
                ) from None
            if isinstance(row, dict):
                yield row, None, line_number
            else:
                kind = type(row).__name__ if not isinstance(row, (int, float)) else "number"
                yield (
                    {},
                    f"a JSON {kind}, not an object with question, options and answer; fix or delete the line",
                    line_number,
                )
    elif suffix == ".csv":
        lines, bad = _text_lines(path)
        reader = csv.reader(lines)
        header = [h.strip() for h in next(reader, [])]
        _check_columns(path, header)
        last_line = reader.line_num
        for values in reader:
            span, last_line = range(last_line + 1, reader.line_num + 1), reader.line_num
            if not values:  # a blank line, as csv.DictReader skips them
                continue
            problem = next((f"{bad[n]}; fix the bytes or delete the line" for n in span if n in bad), None)
            yield {h: v for h, v in zip(header, values) if h}, problem, span.start
    elif suffix in (".xlsx", ".xlsm"):
        yield from ((row, None, number) for row, number in _read_workbook(path))
    else:
        raise DataError(f"{path}: unknown data format {suffix!r}; use the official .csv, the .xlsx export or .jsonl")


def _read_workbook(path: Path) -> Iterator[tuple[dict, int]]:
    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, KeyError, OSError) as e:
        head = path.read_bytes()[:8]
        if head.startswith(b"\xd0\xcf\x11\xe0"):
            what = "it is an old .xls workbook: save it as .xlsx (Excel or LibreOffice) or export CSV"
        elif head.isascii() or _guess_encoding(path.read_bytes()[:4096]):
            what = "it looks like text: if it is CSV, rename it to .csv"
        else:
            what = "the file is damaged or not a spreadsheet: export it again as .xlsx or CSV"
        raise DataError(f"{path}: not an Excel workbook ({type(e).__name__}); {what}") from None
    try:
        rows = workbook.worksheets[0].iter_rows(values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
        _check_columns(path, header)
        for number, values in enumerate(rows, start=2):  # the header is sheet row 1
            if all(v is None for v in values):
                continue
            yield {h: v for h, v in zip(header, values) if h}, number
    finally:
        workbook.close()


def load_questions(path: str | Path, on_bad_row: Literal["skip", "error"] = "skip") -> LoadResult:
    """Load CMExam questions from CSV, XLSX or JSONL.

    Bad rows (empty question, no options, answer not among options, duplicate id) are collected
    with file, row and reason; with ``on_bad_row="error"`` the first one raises `DataError`.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file; give a .csv, .xlsx or .jsonl file")
    if not path.is_file():
        raise DataError(f"{path}: no such data file; check the recipe's data.* paths")
    questions: list[Question] = []
    bad_rows: list[BadRow] = []
    seen_ids: set[str] = set()
    unit = "row" if path.suffix.lower() in (".xlsx", ".xlsm") else "line"
    for row_number, (row, problem, number) in enumerate(_read_rows(path)):
        try:
            if problem:
                raise ValueError(problem)
            try:
                question = _row_to_question(row, row_number)
            except TypeError as e:  # a field of a type no question has (e.g. annotations: 5)
                raise ValueError(f"a field has the wrong type ({e})") from e
            if question.id in seen_ids:
                raise ValueError(f"duplicate id {question.id!r}")
        except ValueError as e:
            bad = BadRow(str(path), number, str(e), unit)
            if on_bad_row == "error":
                raise DataError(f"{bad}. Fix the row, or set data.on_bad_row: skip to skip and count bad rows.") from e
            bad_rows.append(bad)
            continue
        seen_ids.add(question.id)
        questions.append(question)
    if not questions:
        raise DataError(
            f"{path}: no usable question: {describe_bad_rows(bad_rows, len(bad_rows))}; fix the rows, or check that "
            "this is a CMExam file (columns Question, Options, Answer)"
        )
    return LoadResult(questions, bad_rows, str(path))


def describe_bad_rows(bad_rows: list[BadRow], total: int) -> str:
    """ "19 of 20 rows skipped: duplicate id '7' (lines 3, 4, 5, ...); empty question (line 9)": which rows and why."""
    by_reason: dict[str, list[BadRow]] = {}
    for bad in bad_rows:
        by_reason.setdefault(bad.reason, []).append(bad)
    parts = []
    for reason, rows in sorted(by_reason.items(), key=lambda item: -len(item[1]))[:3]:
        unit = rows[0].unit + ("s" if len(rows) > 1 else "")
        numbers = ", ".join(str(b.row) for b in rows[:5]) + (", ..." if len(rows) > 5 else "")
        parts.append(f"{reason} ({unit} {numbers})")
    more = f"; and {len(by_reason) - 3} other reasons" if len(by_reason) > 3 else ""
    return f"{len(bad_rows)} of {total} rows skipped: " + "; ".join(parts) + more


def write_questions(questions: Iterable[Question], path: str | Path) -> int:
    """Write questions as canonical JSONL, atomically; returns the count."""
    rows = [question.to_json() for question in questions]
    write_jsonl(rows, path)
    return len(rows)
