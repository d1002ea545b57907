"""The `data:` recipe section: where the questions come from and how they are split."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from medcritical.core.section import Section, check_uri

BUNDLED = "bundled"  # data.source value: the CMExam sample shipped inside the package


class DataSection(Section):
    # "bundled" (400 CMExam val questions in the package) or a .csv/.xlsx/.jsonl path.
    source: str = BUNDLED
    # A separate evaluation file; when None, `eval_size` questions are split off `source`.
    eval_source: str | None = None
    # Evaluation questions: split off `source`, or sampled from `eval_source` (null: the whole file,
    # as a benchmark number needs; a sample of 100 has a 95% interval of about +-9 points).
    eval_size: int | None = Field(100, ge=0)
    # Cap on training questions (None: all that remain after the split); chosen by seeded hash.
    train_size: int | None = Field(None, ge=1)  # 0 would train on nothing
    # Bad rows (empty question, no options, answer not among options): skip and count, or stop.
    on_bad_row: Literal["skip", "error"] = "skip"
    # Training questions whose text also appears in the eval split: drop them, or stop.
    on_leakage: Literal["drop", "error"] = "drop"

    @field_validator("source", "eval_source")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value in (None, BUNDLED):
            return value
        check_uri(value, "a .csv, .xlsx or .jsonl file")
        if value.startswith("s3://") or Path(value).is_file():
            return value
        if Path(value).is_dir():
            raise ValueError(f"{value!r} is a folder; give a .csv, .xlsx or .jsonl file")
        raise ValueError(f"no such file {value!r}")

    @model_validator(mode="after")
    def _separate_eval_source(self) -> DataSection:
        same = self.eval_source is not None and (
            self.eval_source == self.source
            or (
                Path(self.source).is_file()
                and Path(self.eval_source).is_file()
                and Path(self.source).samefile(self.eval_source)
            )
        )
        if same:
            raise ValueError(
                f"data.eval_source is the training file {self.source!r}: every evaluation question would also be "
                "trained on; give a separate evaluation file, or leave eval_source out to split eval_size off source"
            )
        return self
