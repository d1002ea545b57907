"""Writes tests/data/grader_corpus.jsonl from the hand-written cases in tests/data/grader/cases_*.py.

Every case was written and labelled by hand, in the way the named model family writes (Qwen2.5-Instruct
short answers, QwQ / DeepSeek-R1 reasoning in <think>, HuatuoGPT-o1 "## Thinking / ## Final
Response", and this project's SFT student "<think>...</think>\\n答案：X"). This script only fills in
each case's real CMExam question: «A» in an output becomes option A's text, and the row gets the
question's options, so option texts and abbreviations are the real ones.

    python tests/data/grader/build_corpus.py /work/shared/data/cmexam/val.xlsx
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from cases_en import CASES as CASES_EN  # noqa: E402 (found through the sys.path line above)
from cases_zh import CASES as CASES_ZH  # noqa: E402

from medcritical.data.cmexam import load_questions  # noqa: E402

STATUSES = {"answered", "empty", "ambiguous", "truncated", "invalid"}


def main(val_xlsx: str) -> None:
    by_id = {q.id: q for q in load_questions(val_xlsx).questions}
    rows = []
    for prefix, cases in (("zh", CASES_ZH), ("en", CASES_EN)):
        for n, (style, rule, qid, expected, status, output) in enumerate(cases, 1):
            question = by_id[qid]
            text = re.sub(r"«([A-E])»", lambda m, q=question: q.options[m.group(1)], output)
            assert status in STATUSES, (prefix, n, status)
            assert (status == "answered") == bool(expected), (prefix, n, "letters iff answered")
            rows.append(
                {
                    "id": f"{prefix}-{n:03d}",
                    "style": style,
                    "rule": rule,
                    "question_id": qid,
                    "gold": question.answer,
                    "options": question.options,
                    "output": text,
                    "expected": expected,
                    "status": status,
                }
            )
    out = HERE.parent / "grader_corpus.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/cmexam/val.xlsx")
