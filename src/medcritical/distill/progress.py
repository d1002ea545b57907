"""The append-only progress log, ``distill_raw.jsonl``: every teacher reply, written as it arrives.

Everything else (the SFT set, the rejected traces, the statistics) is derived from it. A rerun after a
crash or Ctrl-C replays it, skips finished questions and continues the others where they stopped, so
no reply is paid for twice. Replies are stored raw; verification is recomputed with the current
grader whenever outputs are built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medcritical.data.cmexam import Question
from medcritical.distill.traces import TEMPLATE, TRACE, parse_template
from medcritical.io.jsonl import append_jsonl, read_jsonl
from medcritical.modeling.llm_client import ChatReply

log = logging.getLogger(__name__)

SESSION, REPLY = "session", "reply"  # event kinds (a session: one run of the step, its status and wall time)


def question_fingerprint(question: Question) -> str:
    """Changes when the question's text, options, answer or expert explanation change (a reused id is not the
    same question; the explanations teacher's trace is the explanation, so a file with explanations added is
    asked again)."""
    payload = json.dumps(
        [question.question, question.options, question.answer, question.explanation], ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


@dataclass
class QuestionProgress:
    """The replies one question has received so far, by attempt number."""

    options: dict[str, str]  # the question's options (a template must not state an answer among them)
    templates: dict[int, ChatReply] = field(default_factory=dict)
    traces: dict[int, ChatReply] = field(default_factory=dict)

    def add(self, kind: str, attempt: int, reply: ChatReply) -> None:
        replies = self.templates if kind == TEMPLATE else self.traces
        replies.setdefault(attempt, reply)

    @property
    def template(self) -> tuple[int, str] | None:
        """(attempt, text) of the first usable template."""
        for attempt, reply in sorted(self.templates.items()):
            text, _ = parse_template(reply, self.options)
            if text is not None:
                return attempt, text
        return None


class ProgressLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """All events; a line torn by a crash mid-write is dropped (its reply is simply asked again)."""
        return read_jsonl(self.path)

    def append(self, event: dict) -> None:
        append_jsonl([event], self.path)


def reply_event(question: Question, kind: str, attempt: int, reply: ChatReply) -> dict:
    return {
        "event": REPLY,
        "id": question.id,
        "question_sha": question_fingerprint(question),
        "kind": kind,
        "attempt": attempt,
        "reply": dataclasses.asdict(reply),
    }


def replay(events: Iterable[dict], questions: Iterable[Question]) -> dict[str, QuestionProgress]:
    """Progress per question id; replies for other questions, or for a question that changed, are ignored."""
    questions = list(questions)
    fingerprints = {q.id: question_fingerprint(q) for q in questions}
    progress = {q.id: QuestionProgress(q.options) for q in questions}
    ignored = 0
    for event in events:
        if event.get("event") != REPLY or event.get("kind") not in (TEMPLATE, TRACE):
            continue
        if fingerprints.get(event.get("id")) != event.get("question_sha"):
            ignored += 1
            continue
        progress[event["id"]].add(event["kind"], int(event["attempt"]), ChatReply(**event["reply"]))
    if ignored:
        log.info("progress log: %d replies belong to questions not in this input (or changed); ignored", ignored)
    return progress
