"""The judge protocols: the student answers without options; a judge model grades the free answer.

Two protocols, each named for what it is, never mixed in one table:

- ``judge-paper``: SP-Huatuo's evaluation, in its own words (``Processingfiles/ForTest.py`` and
  ``ForJudge.py`` of destinybird/SP-Huatuo, quoted in docs/judge.md). The student gets the question
  wrapped in SP-Huatuo's instruction (``student_paper``), as a raw prompt (no chat template unless
  ``evaluate.judge.student_chat_template``), sampled at temperature 0.7, top-p 0.9, 450 new tokens.
  The judge gets SP-Huatuo's system prompt and judge prompt (``judge_paper``: the question, the
  reference answer text and the student's reply after the echoed instruction) and must emit one
  token, ``1`` (correct) or ``2`` (wrong): constrained where the endpoint offers it (vLLM structured
  outputs / guided choice, or a logit bias in ``extra_body``) and parsed strictly. SP-Huatuo forces
  the token, so it has no unusable verdict; here one is dropped from the denominator, counted beside
  the accuracy with the bounds (drops as wrong, drops as right), and more than
  ``evaluate.judge.max_unusable_share`` of them fails the evaluation.
- ``judge-rubric``: the project's richer judge. The student answers the ``open`` prompt greedily;
  the judge sees the reference answer and the expert explanation, may give reasons, and must end
  with the line ``判定：正确`` / ``判定：错误`` (``Verdict: correct`` / ``Verdict: incorrect``). A reply
  without that last line is an error, never a guess; dropped and counted the same way.

Verdicts (and judge errors) are appended to ``judgements.jsonl`` as they arrive, so a rerun pays
for no verdict twice. A request the endpoint failed is not a verdict: nothing is written, the step
ends non-zero, and the rerun asks exactly those again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from medcritical.data.cmexam import Question
from medcritical.errors import InputError
from medcritical.evaluation.config import JudgeSection
from medcritical.grader import final_answer_text
from medcritical.io.jsonl import append_jsonl, read_jsonl
from medcritical.modeling.llm_client import ChatClient
from medcritical.prompts import load_prompt, open_messages

JUDGEMENTS_JSONL = "judgements.jsonl"
JUDGE_ENV_PREFIX = "MEDCRITICAL_JUDGE"  # MEDCRITICAL_JUDGE_BASE_URL, MEDCRITICAL_JUDGE_MODEL
PROTOCOLS = ("judge-paper", "judge-rubric")
# SP-Huatuo's student sampling under judge-paper.
PAPER_STUDENT = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 450}
PAPER_VERDICTS = {"1": True, "2": False}
# ForJudge.py's system message, word for word (the judge prompt itself is prompts/judge_paper.zh.txt).
PAPER_JUDGE_SYSTEM = "You are a helpful assistant."
# The last words of ForTest.py's student prompt: ForJudge.py judges what follows them when a reply echoes it.
PAPER_PROMPT_END = "只解释这一个问题即可"
_RUBRIC_VERDICT = re.compile(r"(?:判定|verdict)\s*[:：]\s*(正确|错误|correct|incorrect)\s*[。.]?", re.IGNORECASE)

# items: [{"id", "question", "reference", "explanation", "response"}] -> {id: judgement row}
Judge = Callable[[list[dict]], dict[str, dict]]


def parse_paper_verdict(reply: str) -> bool | None:
    """``1`` -> correct, ``2`` -> wrong; anything else is no verdict (an error the paper drops)."""
    return PAPER_VERDICTS.get(reply.strip())


def parse_rubric_verdict(reply: str) -> bool | None:
    """The verdict line that must end the reply; None when the last line is not exactly one."""
    lines = [line.strip() for line in final_answer_text(reply).strip().splitlines() if line.strip()]
    match = _RUBRIC_VERDICT.fullmatch(lines[-1]) if lines else None
    return match.group(1).lower() in ("正确", "correct") if match else None


def paper_response(reply: str) -> str:
    """The part of a student reply SP-Huatuo's judge reads: after an echoed instruction, if any."""
    return reply.split(PAPER_PROMPT_END)[-1].strip() if PAPER_PROMPT_END in reply else reply.strip()


def judge_messages(protocol: str, prompt, item: dict) -> list[dict[str, str]]:
    """The judge's conversation: under judge-paper with ForJudge.py's system message, as SP-Huatuo sends it."""
    user = {"role": "user", "content": prompt.format(**_fields(item))}
    return [{"role": "system", "content": PAPER_JUDGE_SYSTEM}, user] if protocol == "judge-paper" else [user]


def reference_answer(question: Question) -> str:
    """The gold options' texts: the student never saw the letters."""
    return "；".join(question.options[letter] for letter in question.answer)


def student_prompts(protocol: str, questions: Sequence[Question], language: str, chat_template: bool) -> list:
    """What the student is asked: chat messages, or a raw string (judge-paper without chat template)."""
    if protocol == "judge-rubric":
        return [open_messages(q, language) for q in questions]
    prompt = load_prompt("student_paper", language)
    texts = [prompt.format(question=q.question) for q in questions]
    return [[{"role": "user", "content": t}] for t in texts] if chat_template else texts


def student_sampling(protocol: str, max_new_tokens: int) -> dict:
    """Sampling of the student's answers: the paper's under judge-paper, greedy under judge-rubric."""
    if protocol == "judge-paper":
        return dict(PAPER_STUDENT)
    return {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": max_new_tokens}


def judge_request(protocol: str, config: JudgeSection) -> dict:
    """Request parameters of the judge under `protocol`."""
    if protocol == "judge-rubric":
        return {"temperature": 0.0, "max_tokens": config.max_tokens}
    constraint = {
        "structured_outputs": {"structured_outputs": {"choice": list(PAPER_VERDICTS)}},
        "guided_choice": {"guided_choice": list(PAPER_VERDICTS)},
        "none": {},
    }[config.verdict_constraint]
    return {"temperature": 0.0, "max_tokens": 1, **constraint}


def judge_from_config(config: JudgeSection, protocol: str, language: str, output_dir: str | Path) -> Judge:
    """A judge on an OpenAI-compatible endpoint, resuming from `output_dir/judgements.jsonl`.

    The endpoint is probed here, so a dead judge or a refused key stops the step before the student
    generates anything."""

    if protocol not in PROTOCOLS:
        raise InputError(f"no judge protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    client = ChatClient.from_section(config, JUDGE_ENV_PREFIX)
    prompt = load_prompt(protocol.replace("-", "_"), language)
    parse = parse_paper_verdict if protocol == "judge-paper" else parse_rubric_verdict
    path = Path(output_dir) / JUDGEMENTS_JSONL
    client.probe()

    def judge(items: list[dict]) -> dict[str, dict]:
        # A verdict resumes only under the same protocol and prompt wording (the fingerprint holds the rest).
        done = {
            row["id"]: row
            for row in read_jsonl(path)
            if row.get("protocol") == protocol and row.get("prompt_version") == prompt.version
        }
        todo = [item for item in items if item["id"] not in done]

        def save(index: int, reply) -> None:
            if reply.endpoint_failed:  # not a verdict: nothing saved, the rerun asks again
                return
            # A reasoning parser puts a reply that never closed </think> into the reasoning field.
            text = reply.content.strip() or reply.reasoning_content.strip()
            verdict = parse(text) if reply.ok else None
            error = reply.error or (None if verdict is not None else f"no {protocol} verdict in the reply")
            row = {
                "id": todo[index]["id"],
                "protocol": protocol,
                "verdict": verdict,
                "error": error,
                "reply": text,
                "prompt_version": prompt.version,
            }
            append_jsonl([row], path)
            done[row["id"]] = row

        conversations = [judge_messages(protocol, prompt, item) for item in todo]
        client.chat_many(conversations, on_reply=save, desc=f"judging ({protocol})", **judge_request(protocol, config))
        client.raise_if_failed(f"evaluate ({protocol})")
        return done

    return judge


def _fields(item: dict) -> dict:
    return {k: item[k] for k in ("question", "reference", "explanation", "response")}


def grade_with_judge(
    protocol: str, questions: Sequence[Question], outputs: dict[str, dict], judge: Judge
) -> list[dict]:
    """One graded row per question; ``verdict`` None marks a judge error: ``dropped`` true, left out of the
    accuracy and of every paired comparison (`compare.correct_by_id`) alike."""
    items = [
        {
            "id": q.id,
            "question": q.question,
            "reference": reference_answer(q),
            "explanation": q.explanation or "（无）",
            # judge-paper: the student's reply as ForJudge.py reads it; judge-rubric: its conclusion after </think>.
            "response": (
                paper_response(outputs[q.id]["output"])
                if protocol == "judge-paper"
                else final_answer_text(outputs[q.id]["output"]).strip()
            ),
        }
        for q in questions
    ]
    judgements = judge(items)
    rows = []
    for q in questions:
        row = judgements.get(q.id, {})
        rows.append(
            {
                "id": q.id,
                "predicted": "",  # no letters under the judge protocols
                "correct": row.get("verdict") is True,
                "verdict": row.get("verdict"),
                "dropped": row.get("verdict") is None,
                "judge_error": row.get("error", "no judgement"),
                "judge_reply": row.get("reply", ""),
                "output": outputs[q.id]["output"],
                "has_output": True,
            }
        )
    return rows
