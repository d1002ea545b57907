"""`distill.backend: openai` end to end against a real vLLM OpenAI-compatible server, resume included.

The tiny model writes random text, so nothing is accepted; what is checked is the protocol: the
template and trace requests made, the fields read (`content` without a reasoning parser, `reasoning`
with one), every reply recorded once, the statistics, and an interrupted run whose rerun asks only
what is missing.
"""

import pytest

from medcritical.distill.config import DistillSection, OpenAITeacher
from medcritical.distill.run import RAW_FILE, STATS_FILE, distill
from medcritical.distill.teachers import build_teacher
from medcritical.distill.traces import DistillPrompts
from medcritical.io.jsonl import read_jsonl
from tests.test_distill import InterruptAfter

pytestmark = pytest.mark.vllm


class Counting:
    """The real teacher, with the requests it was asked to send written down."""

    def __init__(self, teacher):
        self.teacher, self.asked = teacher, []
        self.description, self.deterministic = teacher.description, teacher.deterministic

    def probe(self):
        self.teacher.probe()

    def complete(self, requests, **kwargs):
        self.asked += [(r.question.id, r.kind, r.attempt) for r in requests]
        self.teacher.complete(requests, **kwargs)


def served_config(server, **overrides):
    openai = OpenAITeacher(base_url=server.base_url, model=server.model, concurrency=4, timeout_s=120, max_retries=1)
    return DistillSection(
        **(
            {"backend": "openai", "openai": openai, "attempts": 2, "max_new_tokens": 24, "template_max_new_tokens": 16}
            | overrides
        )
    )


def replies(path):
    return [e for e in read_jsonl(path / RAW_FILE) if e["event"] == "reply"]


def test_teacher_end_to_end_with_an_interrupted_run_resumed(plain_vllm_server, bundled, tmp_path):
    questions = bundled[:6]
    config = served_config(plain_vllm_server)
    teacher = build_teacher(config, DistillPrompts.load("zh"))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after all templates and 2 first traces
        distill(config, questions, tmp_path, teacher=InterruptAfter(teacher, 6 + 2))
    before = {(e["id"], e["kind"], e["attempt"]) for e in replies(tmp_path)}
    assert len(before) == 8

    rerun = Counting(build_teacher(config, DistillPrompts.load("zh")))
    stats = distill(config, questions, tmp_path, teacher=rerun)
    assert before.isdisjoint(rerun.asked)  # nothing asked twice
    events = replies(tmp_path)
    keys = [(e["id"], e["kind"], e["attempt"]) for e in events]
    assert len(keys) == len(set(keys)) == 6 + 12 and set(rerun.asked) == set(keys) - before
    # Without a reasoning parser the reply is the content; the tiny model's text has no <think> block.
    assert all(
        e["reply"]["content"] and not e["reply"]["error"] and e["reply"]["completion_tokens"] > 0 for e in events
    )
    assert (stats["questions"], stats["trace_attempts"], stats["template_requests"], stats["sessions"]) == (6, 12, 6, 2)
    assert stats["tokens"]["completion"] > 0 and stats["http_requests"] == 18 and stats["unfinished_questions"] == []
    assert stats["teacher"] == {
        "backend": "openai",
        "model": plain_vllm_server.model,
        "base_url": plain_vllm_server.base_url,
    }
    assert (tmp_path / STATS_FILE).is_file()


def test_teacher_reasoning_field_with_the_parser(vllm_server, bundled, tmp_path):
    stats = distill(served_config(vllm_server, attempts=1), bundled[:3], tmp_path)
    events = replies(tmp_path)
    # The parser files the whole (never closed) output under `reasoning`: recorded, and the template
    # it should have written after </think> is missing, which is what the rejection says.
    assert len(events) == 3 and all(e["reply"]["reasoning_content"] and e["reply"]["content"] == "" for e in events)
    assert stats["rejections"] == {"empty template": 3} and stats["accepted"] == 0
