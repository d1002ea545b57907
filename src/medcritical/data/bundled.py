"""The CMExam sample shipped inside the package (see sample/NOTICE.md for source and license)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from medcritical.data.cmexam import Question, load_questions


def bundled_path() -> Path:
    return Path(str(resources.files("medcritical.data") / "sample" / "cmexam_val_sample.jsonl"))


def bundled_questions() -> list[Question]:
    return load_questions(bundled_path(), on_bad_row="error").questions
