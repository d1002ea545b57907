"""The openai teacher backend's bookkeeping against a scripted stand-in endpoint on 127.0.0.1.

The stand-in answers the way served reasoning models do (a <think> block in the content, or the
reasoning in a separate reasoning_content field) and fails on cue (5xx, 429, timeouts, malformed
bodies, dropped connections): what is tested is our side: requests, verification, bookkeeping,
resume, outages that end the step non-zero and a rerun that asks exactly the failed requests, and
that the API key never reaches a file or a log. The same path against real vLLM:
tests/test_served_distill.py.
"""

import json
import logging
import re

import pytest

from medcritical.distill.config import DistillSection, OpenAITeacher
from medcritical.distill.run import RAW_FILE, REJECTED_FILE, SFT_FILE, STATS_FILE, distill
from medcritical.distill.teachers import build_teacher
from medcritical.distill.traces import DistillPrompts, split_reasoning
from medcritical.grader import grade_answer
from medcritical.modeling.llm_client import EndpointError, EndpointFailures
from tests.fixtures.chat_endpoint import Response, StandInEndpoint, completion, fast_sdk_retries
from tests.test_distill import InterruptAfter, read_jsonl

KEY = "sk-distill-secret-abcdef987654"
TEMPLATE_TEXT = "1. 明确考点\n2. 逐项分析选项\n3. 得出结论"


@pytest.fixture
def teacher_env(monkeypatch):
    fast_sdk_retries(monkeypatch)
    monkeypatch.setenv("MEDCRITICAL_TEACHER_API_KEY", KEY)
    monkeypatch.delenv("MEDCRITICAL_TEACHER_BASE_URL", raising=False)
    monkeypatch.delenv("MEDCRITICAL_TEACHER_MODEL", raising=False)


def config_for(endpoint, **overrides):
    settings = dict(
        backend="openai",
        openai=OpenAITeacher(base_url=endpoint.base_url, model="QwQ-32B", concurrency=4, timeout_s=5, max_retries=2),
        attempts=2,
        show_gold_answer=True,
        price_per_million_tokens=2.0,
    )
    return DistillSection(**(settings | overrides))


def is_trace_prompt(body):
    return "<think>" in body["messages"][-1]["content"]


def gold_from_prompt(body):
    return re.search(r"参考答案：([A-E]+)", body["messages"][-1]["content"]).group(1)


def gold_from_prompt_or_a(body):
    match = re.search(r"参考答案：([A-E]+)", body["messages"][-1]["content"])
    return match.group(1) if match else "A"


class WrongThenRight:
    """Template; then a wrong first trace (<think> in content) and a right second one (reasoning_content).

    The attempt is the order in which a trace prompt's distinct seeds arrived (each attempt has its own
    seed, the same again when resent), not how often the stand-in saw the prompt: a request cancelled by
    an interruption may have reached it.
    """

    def __init__(self):
        self.seeds: dict[str, list[int]] = {}

    def __call__(self, body, count):
        if not is_trace_prompt(body):
            return completion(f"<think>想一想</think>\n{TEMPLATE_TEXT}", prompt_tokens=100, completion_tokens=50)
        gold = gold_from_prompt(body)
        seen = self.seeds.setdefault(body["messages"][-1]["content"], [])
        if body["seed"] not in seen:
            seen.append(body["seed"])
        if seen.index(body["seed"]) == 0:
            wrong = "A" if gold != "A" else "B"
            return completion(
                f"<think>\n草率的推理\n</think>\n\n答案：{wrong}", prompt_tokens=200, completion_tokens=300
            )
        return completion(f"答案：{gold}", f"仔细推理，逐项分析，故选{gold}", prompt_tokens=200, completion_tokens=300)


def test_verified_traces_statistics_and_no_key_anywhere(bundled, tmp_path, teacher_env, caplog):
    caplog.set_level(logging.DEBUG)
    questions = bundled[:8]
    with StandInEndpoint(WrongThenRight()) as endpoint:
        stats = distill(config_for(endpoint), questions, tmp_path)
    rows = read_jsonl(tmp_path / SFT_FILE)
    assert [r["id"] for r in rows] == [q.id for q in questions]
    for row, question in zip(rows, questions):
        content = row["messages"][-1]["content"]
        assert grade_answer(content, question.answer, question.options).correct
        reasoning, final = split_reasoning(content)
        assert reasoning.startswith("【思维模板】\n" + TEMPLATE_TEXT)  # the template opens the <think> block
        assert "仔细推理" in reasoning and "想一想" not in reasoning
        assert row["metadata"]["attempt"] == 2
        assert row["metadata"]["source"] == "openai" and row["metadata"]["teacher"] == "QwQ-32B"
    rejected = read_jsonl(tmp_path / REJECTED_FILE)
    assert len(rejected) == 8 and all(r["reason"].startswith("wrong answer") and r["attempt"] == 1 for r in rejected)
    assert all(r["template"] == TEMPLATE_TEXT for r in rejected)

    # The gold hint was shown (show_gold_answer) and the template was passed on to the trace prompt.
    traces = [t for t in endpoint.user_texts() if "<think>" in t]
    assert len(traces) == 16 and all("参考答案：" in t and TEMPLATE_TEXT in t for t in traces)
    assert {r["authorization"] for r in endpoint.requests} == {f"Bearer {KEY}"}

    assert (stats["questions"], stats["accepted"], stats["trace_attempts"], stats["template_requests"]) == (8, 8, 16, 8)
    assert stats["trace_acceptance_rate"] == 0.5 and stats["rejections"] == {"wrong answer": 8}
    assert stats["tokens"] == {"prompt": 8 * 100 + 16 * 200, "completion": 8 * 50 + 16 * 300, "total": 9200}
    assert stats["estimated_cost"] == pytest.approx(9200 / 1e6 * 2.0)
    assert stats["settings"]["show_gold_answer"] is True and stats["teacher"]["model"] == "QwQ-32B"
    assert stats["prompts"] == DistillPrompts.load("zh").versions
    assert (
        stats["by_type"]["single_answer"]["trace_attempts"] + stats["by_type"]["multi_answer"]["trace_attempts"] == 16
    )

    for path in tmp_path.iterdir():
        assert KEY not in path.read_text(encoding="utf-8"), path
    assert KEY not in caplog.text


def test_unusable_and_refused_replies_are_rejected_attempts(bundled, tmp_path, teacher_env):
    questions = bundled[:6]
    bad_by_question = {
        questions[0].question: Response(400, {"error": "prompt has a bad token"}),
        questions[1].question: completion("我认为答案是C，但没有推理"),  # no reasoning block
        questions[2].question: completion("<think>推理到一半", finish_reason="length"),  # truncated
        questions[3].question: completion("<think>推理</think>\n无法确定"),  # no answer statement
        questions[4].question: Response(400, {"error": "context length exceeded"}),
        questions[5].question: completion(""),
    }

    def respond(body, count):
        if not is_trace_prompt(body):
            return completion(TEMPLATE_TEXT)
        text = body["messages"][-1]["content"]
        return next(response for stem, response in bad_by_question.items() if stem in text)

    with StandInEndpoint(respond) as endpoint:
        stats = distill(config_for(endpoint), questions, tmp_path)
    assert stats["accepted"] == 0 and stats["trace_attempts"] == 12
    reasons = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / REJECTED_FILE) if r["attempt"] == 1}
    assert reasons[questions[0].id].startswith("teacher failed: HTTP 400")
    assert reasons[questions[1].id].startswith("no reasoning")
    assert "token limit" in reasons[questions[2].id]
    assert reasons[questions[3].id].startswith("no answer statement")
    assert "HTTP 400" in reasons[questions[4].id]
    assert reasons[questions[5].id].startswith("empty reply")
    assert sum(stats["rejections"].values()) == 12
    assert read_jsonl(tmp_path / SFT_FILE) == []


def test_verify_off_keeps_well_formed_wrong_traces(bundled, tmp_path, teacher_env):
    questions = [q for q in bundled if q.answer != "A"][:4]

    def respond(body, count):
        return completion("<think>推理</think>\n答案：A") if is_trace_prompt(body) else completion(TEMPLATE_TEXT)

    with StandInEndpoint(respond) as endpoint:
        stats = distill(config_for(endpoint, verify=False, show_gold_answer=False), questions, tmp_path)
    assert all("参考答案" not in t for t in endpoint.user_texts())  # gold never shown by default
    rows = read_jsonl(tmp_path / SFT_FILE)
    assert len(rows) == 4 and all(r["metadata"]["correct"] is False for r in rows)
    assert stats["accepted"] == 4 and stats["trace_attempts"] == 4 and stats["correct_traces"] == 0


def test_unusable_templates_are_retried_then_the_question_is_given_up(bundled, tmp_path, teacher_env):
    questions = bundled[:3]

    def respond(body, count):
        if is_trace_prompt(body):
            return completion(f"<think>r</think>答案：{gold_from_prompt(body)}")
        if questions[0].question in body["messages"][-1]["content"]:
            if count == 0:
                return completion("<think>只有思考</think>", finish_reason="length")  # no template after thinking
            return completion(f"1. 明确考点\n答案：{gold_from_prompt_or_a(body)}")  # answers instead of a template
        return completion(TEMPLATE_TEXT)

    with StandInEndpoint(respond) as endpoint:
        stats = distill(config_for(endpoint), questions, tmp_path)
    assert stats["accepted"] == 2 and stats["template_requests"] == 2 + 2
    rejected = read_jsonl(tmp_path / REJECTED_FILE)
    assert [(r["id"], r["kind"]) for r in rejected] == [(questions[0].id, "template")] * 2
    reasons = [r["reason"] for r in rejected]
    assert reasons[0].startswith("empty template") and reasons[1].startswith("template states an answer")


FAULTS = {  # what the endpoint does wrong -> the kind the error message names
    "HTTP 500": Response(500, {"error": "internal error"}),
    "HTTP 429": Response(429, {"error": "rate limited"}),
    "malformed response": Response(200, "<html>proxy error</html>"),
    "timed out": Response(delay_s=1.0, body={}),
    "connection error": Response(body=completion("x").body, drop=True),
}


@pytest.mark.parametrize("kind", FAULTS)
def test_endpoint_failures_end_the_step_and_a_rerun_asks_exactly_those(kind, bundled, tmp_path, teacher_env):
    questions = bundled[:6]
    broken = {questions[1].question, questions[4].question}
    endpoint_fixed = []

    def respond(body, count):
        text = body["messages"][-1]["content"]
        if not is_trace_prompt(body):
            return completion(TEMPLATE_TEXT)
        if not endpoint_fixed and any(stem in text for stem in broken):
            return FAULTS[kind]
        return completion(f"<think>推理</think>\n答案：{gold_from_prompt(body)}")

    with StandInEndpoint(respond) as endpoint:
        config = config_for(
            endpoint, openai=OpenAITeacher(base_url=endpoint.base_url, model="QwQ-32B", timeout_s=0.3, max_retries=1)
        )
        with pytest.raises(EndpointFailures) as error:
            distill(config, questions, tmp_path)
        message = str(error.value)
        assert message.startswith(f"distill: 2 requests to {endpoint.base_url}") and f"2 {kind}" in message
        assert "rerun" in message and KEY not in message
        assert endpoint.probes == 1  # the endpoint was probed before the first batch
        # The failures are no attempts: nothing of theirs in the progress log, the others finished.
        replies = [e for e in read_jsonl(tmp_path / RAW_FILE) if e["event"] == "reply"]
        assert {e["id"] for e in replies if e["kind"] == "trace"} == {q.id for q in questions} - {
            questions[1].id,
            questions[4].id,
        }
        stats = json.loads((tmp_path / STATS_FILE).read_text())
        assert stats["unfinished_questions"] == sorted([questions[1].id, questions[4].id])
        assert stats["accepted"] == 4 and stats["trace_attempts"] == 4 and "teacher failed" not in stats["rejections"]

        endpoint_fixed.append(True)
        asked_before = len(endpoint.requests)
        stats = distill(config, questions, tmp_path)
        asked_again = endpoint.user_texts()[asked_before:]
    assert len(asked_again) == 2 and all(is_trace_prompt({"messages": [{"content": t}]}) for t in asked_again)
    assert {stem for stem in broken for t in asked_again if stem in t} == broken
    assert stats["accepted"] == 6 and stats["trace_attempts"] == 6 and stats["unfinished_questions"] == []
    assert all(r["metadata"]["attempt"] == 1 for r in read_jsonl(tmp_path / SFT_FILE))


def test_too_many_failures_stop_early(bundled, tmp_path, teacher_env):
    def respond(body, count):
        return Response(503, {"error": "overloaded"}) if is_trace_prompt(body) else completion(TEMPLATE_TEXT)

    with StandInEndpoint(respond) as endpoint:
        config = config_for(
            endpoint,
            openai=OpenAITeacher(
                base_url=endpoint.base_url, model="m", concurrency=1, max_retries=0, max_failed_requests=2
            ),
        )
        with pytest.raises(EndpointFailures, match="Stopped early: more than max_failed_requests=2"):
            distill(config, bundled[:10], tmp_path)
    assert sum(is_trace_prompt(r["body"]) for r in endpoint.requests) == 3


def test_a_dead_endpoint_stops_before_any_work(bundled, tmp_path, teacher_env):
    with StandInEndpoint(lambda body, count: completion("x")) as endpoint:
        url = endpoint.base_url
    config = config_for(endpoint)
    with pytest.raises(EndpointError, match=f"{url} cannot be reached"):
        distill(config, bundled[:3], tmp_path)
    assert not [e for e in read_jsonl(tmp_path / RAW_FILE) if e["event"] == "reply"]


def test_401_stops_the_run_at_once(bundled, tmp_path, teacher_env):
    refused = Response(401, {"error": "invalid key"})
    with (
        StandInEndpoint(lambda body, count: refused, models=refused) as endpoint,
        pytest.raises(EndpointError, match="MEDCRITICAL_TEACHER_API_KEY"),
    ):
        distill(config_for(endpoint), bundled[:20], tmp_path)
    assert len(endpoint.requests) == 0 and endpoint.probes == 1  # the probe found it before any work
    events = read_jsonl(tmp_path / RAW_FILE)
    assert not [e for e in events if e["event"] == "reply"]
    assert (events[-1]["event"], events[-1]["status"]) == ("session", "interrupted")


def test_resume_over_the_endpoint_asks_nothing_twice(bundled, tmp_path, teacher_env):
    questions = bundled[:10]
    with StandInEndpoint(WrongThenRight()) as endpoint:
        config = config_for(endpoint)
        teacher = build_teacher(config, DistillPrompts.load("zh"))
        with pytest.raises(KeyboardInterrupt):  # after all templates and 7 first traces
            distill(config, questions, tmp_path, teacher=InterruptAfter(teacher, 10 + 7))
        stats = distill(config, questions, tmp_path)
    events = [e for e in read_jsonl(tmp_path / RAW_FILE) if e["event"] == "reply"]
    keys = [(e["id"], e["kind"], e["attempt"]) for e in events]
    assert len(keys) == len(set(keys)) == 10 + 20
    templates_asked = [t for t in endpoint.user_texts() if "<think>" not in t]
    assert len(templates_asked) == 10  # none asked again after the interruption
    assert stats["accepted"] == 10 and stats["sessions"] == 2
    assert [r["id"] for r in read_jsonl(tmp_path / SFT_FILE)] == [q.id for q in questions]
    assert json.loads((tmp_path / STATS_FILE).read_text())["trace_attempts"] == 20


def test_cli_exits_non_zero_on_an_outage_and_zero_after_the_fixed_rerun(bundled, tmp_path, teacher_env, capsys):
    from medcritical.cli import main
    from medcritical.data.cmexam import write_questions

    write_questions(bundled[:3], tmp_path / "train.jsonl")
    fixed = []

    def respond(body, count):
        if not fixed and is_trace_prompt(body):
            return Response(500, {"error": "down"})
        return (
            completion(f"<think>推理</think>\n答案：{gold_from_prompt(body)}")
            if is_trace_prompt(body)
            else completion(TEMPLATE_TEXT)
        )

    with StandInEndpoint(respond) as endpoint:
        command = [
            "distill",
            "--questions",
            str(tmp_path / "train.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--set",
            "distill.backend=openai",
            "--set",
            f"distill.openai.base_url={endpoint.base_url}",
            "--set",
            "distill.openai.model=m",
            "--set",
            "distill.openai.max_retries=0",
            "--set",
            "distill.show_gold_answer=true",
        ]
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"3 requests to {endpoint.base_url}" in err and "3 HTTP 500" in err and "rerun" in err and KEY not in err
        fixed.append(True)
        assert main(command) == 0
    assert len(read_jsonl(tmp_path / "out" / SFT_FILE)) == 3
