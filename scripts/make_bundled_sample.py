"""Rebuild the bundled CMExam sample from the validation split export.

    python scripts/make_bundled_sample.py ../shared/data/cmexam/val.xlsx

Takes every 17th question (400 questions across the whole file, keeping the original row number
as the id so each sample question can be traced back), and writes it as canonical JSONL.
"""

import sys
from pathlib import Path

from medcritical.data.cmexam import load_questions, write_questions

STRIDE, COUNT = 17, 400
OUT = Path(__file__).resolve().parents[1] / "src/medcritical/data/sample/cmexam_val_sample.jsonl"

if __name__ == "__main__":
    loaded = load_questions(sys.argv[1], on_bad_row="skip")
    for bad in loaded.bad_rows:
        print(f"skipped {bad}")
    sample = loaded.questions[::STRIDE][:COUNT]
    write_questions(sample, OUT)
    multi = sum(q.is_multi_answer for q in sample)
    print(f"wrote {len(sample)} questions ({multi} multi-answer) to {OUT}")
