"""The paper's open-ended protocol: a judge model decides whether a free answer matches the reference.

The student saw the question without options; the judge sees the question, the reference answer
(gold option texts) and the expert explanation, and the student's conclusion (the text after
``</think>``). Verdicts are appended to ``judgements.jsonl`` as they arrive, so a rerun after a crash
pays for no verdict twice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Sequence

from medcritical.data.cmexam import Question
from medcritical.evaluation.config import JudgeConfig
from medcritical.grader import final_answer_text
from medcritical.prompts import load_prompt

JUDGEMENTS_JSONL = "judgements.jsonl"
_VERDICT = re.compile(r"不正确|错误|正确|incorrect|correct", re.IGNORECASE)
_NEGATIVE = {"不正确", "错误", "incorrect"}

# items: [{"id", "question", "reference", "explanation", "response"}] -> {id: (verdict or None, raw reply)}
Judge = Callable[[list[dict]], dict[str, tuple[bool | None, str]]]


def parse_verdict(reply: str) -> bool | None:
    """The judge's last verdict word; None when it gave none (counted wrong, and reported)."""
    words = _VERDICT.findall(reply)
    if not words:
        return None
    return words[-1].lower() not in _NEGATIVE


def reference_answer(question: Question) -> str:
    return "；".join(f"{letter}. {question.options[letter]}" for letter in question.answer)


def judge_from_config(config: JudgeConfig, language: str, output_dir: str | Path) -> Judge:
    """A judge on an OpenAI-compatible endpoint, resuming from `output_dir/judgements.jsonl`."""
    from medcritical.llm_client import ChatClient

    client = ChatClient.from_section(config, "MEDCRITICAL_JUDGE")
    prompt = load_prompt("judge", language)
    path = Path(output_dir) / JUDGEMENTS_JSONL

    def judge(items: list[dict]) -> dict[str, tuple[bool | None, str]]:
        done: dict[str, tuple[bool | None, str]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                done[row["id"]] = (row["verdict"], row["reply"])
        todo = [item for item in items if item["id"] not in done]
        conversations = [
            [{"role": "user", "content": prompt.format(**{k: item[k] for k in ("question", "reference", "explanation", "response")})}]
            for item in todo
        ]
        with path.open("a", encoding="utf-8") as f:

            def save(index: int, reply) -> None:
                if not reply.ok:  # not saved: a rerun asks again
                    return
                verdict = parse_verdict(reply.content)
                done[todo[index]["id"]] = (verdict, reply.content)
                f.write(json.dumps({"id": todo[index]["id"], "verdict": verdict, "reply": reply.content,
                                    "prompt_version": prompt.version}, ensure_ascii=False) + "\n")
                f.flush()

            client.chat_many(conversations, on_reply=save, desc="judging", temperature=0.0, max_tokens=config.max_tokens)
        return done

    return judge


def grade_with_judge(questions: Sequence[Question], outputs: dict[str, dict], judge: Judge) -> list[dict]:
    """Graded rows for the judge protocol; a missing or unparsable verdict counts wrong and is marked."""
    items = [
        {
            "id": q.id,
            "question": q.question,
            "reference": reference_answer(q),
            "explanation": q.explanation or "（无）",
            "response": final_answer_text(outputs[q.id]["output"]).strip() if q.id in outputs else "",
        }
        for q in questions
    ]
    verdicts = judge(items)
    rows = []
    for q, item in zip(questions, items):
        verdict, reply = verdicts.get(q.id, (None, ""))
        rows.append(
            {
                "id": q.id,
                "predicted": "",  # no letters under this protocol
                "correct": bool(verdict),
                "verdict": verdict,
                "judge_reply": reply,
                "output": outputs.get(q.id, {}).get("output"),
                "has_output": q.id in outputs,
            }
        )
    return rows
