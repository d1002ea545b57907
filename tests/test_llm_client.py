"""ChatClient (over the openai SDK) against a scripted stand-in on 127.0.0.1: the faults a real server
cannot make on cue (429, 5xx, timeouts, malformed bodies, dropped connections, refused keys), and
concurrency. What works against a real server is in tests/test_served_client.py."""

import logging
import socket
import threading
import time

import pytest

from medcritical.modeling.llm_client import ChatClient, EndpointError, EndpointFailures, safe_url
from tests.fixtures.chat_endpoint import Response, StandInEndpoint, completion, fast_sdk_retries

KEY = "sk-test-very-secret-0123456789"


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    fast_sdk_retries(monkeypatch)


def conversation(text):
    return [{"role": "user", "content": text}]


def client_for(endpoint, **kwargs):
    settings = dict(api_key=KEY, concurrency=4, timeout_s=5.0, max_retries=3)
    settings.update(kwargs)
    return ChatClient(endpoint.base_url, "teacher-model", **settings)


def test_replies_in_order_with_reasoning_usage_and_key_header():
    def respond(body, count):
        text = body["messages"][-1]["content"]
        if text == "separate":
            return completion("答案：B", "long reasoning", prompt_tokens=7, completion_tokens=11)
        if text == "vllm-new-field":
            return completion("答案：C", "newer field", reasoning_field="reasoning")
        return completion(f"echo {text}", finish_reason="length")

    arrived = []
    with StandInEndpoint(respond) as endpoint:
        client = client_for(endpoint)
        replies = client.chat_many(
            [conversation("one"), conversation("separate"), conversation("vllm-new-field")],
            on_reply=lambda i, r: arrived.append(i),
            temperature=0.5,
            max_tokens=99,
            seed=None,
        )
    assert sorted(arrived) == [0, 1, 2]
    assert [r.content for r in replies] == ["echo one", "答案：B", "答案：C"]
    assert replies[0].finish_reason == "length" and replies[0].reasoning_content == ""
    assert replies[1].reasoning_content == "long reasoning"
    assert (replies[1].prompt_tokens, replies[1].completion_tokens) == (7, 11)
    assert replies[2].reasoning_content == "newer field"
    assert all(r.ok and r.requests == 1 for r in replies)
    body = endpoint.requests[0]["body"]
    assert body["model"] == "teacher-model" and body["temperature"] == 0.5 and body["max_tokens"] == 99
    assert "seed" not in body  # None values are left out
    assert {r["authorization"] for r in endpoint.requests} == {f"Bearer {KEY}"}


def test_no_key_sends_no_authorization_and_never_reads_openai_api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-someone-elses-openai-key")
    with StandInEndpoint(lambda body, count: completion("ok")) as endpoint:
        assert ChatClient(endpoint.base_url, "m").chat_many([conversation("x")])[0].ok
    assert endpoint.requests[0]["authorization"] is None


def test_429_and_5xx_are_retried_until_success():
    def respond(body, count):
        text = body["messages"][-1]["content"]
        if text == "rate-limited" and count < 2:
            return Response(429, {"error": "slow down"}, headers={"Retry-After": "0"})
        if text == "flaky" and count < 3:
            return Response([500, 502, 503][count], {"error": "busy"})
        return completion(f"ok {text}")

    with StandInEndpoint(respond) as endpoint:
        replies = client_for(endpoint).chat_many([conversation("rate-limited"), conversation("flaky")])
    assert [r.content for r in replies] == ["ok rate-limited", "ok flaky"]
    assert [r.requests for r in replies] == [3, 4]
    assert len(endpoint.requests) == 7


def test_retries_give_up_and_record_the_error_without_raising():
    with StandInEndpoint(lambda body, count: Response(503, {"error": "overloaded"})) as endpoint:
        reply = client_for(endpoint, max_retries=2).chat_many([conversation("x")])[0]
    assert not reply.ok and reply.requests == 3 and reply.endpoint_failed
    assert "HTTP 503" in reply.error and "gave up after 3 attempts" in reply.error
    assert len(endpoint.requests) == 3


def test_client_errors_other_than_auth_are_not_retried():
    with StandInEndpoint(lambda body, count: Response(400, {"error": "prompt too long"})) as endpoint:
        reply = client_for(endpoint).chat_many([conversation("x")])[0]
    assert reply.requests == 1 and "HTTP 400" in reply.error and "prompt too long" in reply.error
    assert not reply.endpoint_failed  # the request was refused, not the endpoint down
    assert len(endpoint.requests) == 1


def test_malformed_success_body_is_recorded():
    def respond(body, count):
        return Response(200, "this is not json" if body["messages"][-1]["content"] == "a" else {"choices": []})

    with StandInEndpoint(respond) as endpoint:
        replies = client_for(endpoint).chat_many([conversation("a"), conversation("b")])
    assert all(not r.ok and r.error.startswith("malformed response") and r.endpoint_failed for r in replies)


def test_connection_dropped_mid_reply_is_retried_then_recorded():
    def respond(body, count):
        text = body["messages"][-1]["content"]
        return (
            completion(f"ok {text}")
            if text == "drop-once" and count
            else Response(body=completion("x").body, drop=True)
        )

    with StandInEndpoint(respond) as endpoint:
        replies = client_for(endpoint, max_retries=1).chat_many([conversation("drop-once"), conversation("always")])
    assert replies[0].ok and replies[0].content == "ok drop-once" and replies[0].requests == 2
    assert not replies[1].ok and "connection error" in replies[1].error and replies[1].endpoint_failed


def test_timeout_is_retried_then_recorded():
    def respond(body, count):
        text = body["messages"][-1]["content"]
        slow = text == "always-slow" or (text == "slow-once" and count == 0)
        return completion(f"ok {text}") if not slow else Response(delay_s=1.5, body={})

    with StandInEndpoint(respond) as endpoint:
        replies = client_for(endpoint, timeout_s=0.3, max_retries=1).chat_many(
            [conversation("slow-once"), conversation("always-slow")]
        )
    assert replies[0].ok and replies[0].content == "ok slow-once" and replies[0].requests == 2
    assert not replies[1].ok and "timed out after 0.3 s" in replies[1].error and replies[1].requests == 2


def test_connection_refused_is_retried_then_recorded():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=2)
    reply = client.chat_many([conversation("x")])[0]
    assert not reply.ok and "connection error" in reply.error and reply.requests == 3 and reply.endpoint_failed


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_stop_at_once_without_leaking_the_key(status, caplog):
    caplog.set_level(logging.DEBUG)

    # The server echoes the key in its error text, as some proxies do; the client must mask it.
    def respond(body, count):
        return Response(status, {"error": f"bad key {KEY}"})

    with StandInEndpoint(respond) as endpoint:
        client = client_for(endpoint, concurrency=2, key_source="the environment variable MY_KEY")
        with pytest.raises(EndpointError) as error:
            client.chat_many([conversation(str(i)) for i in range(20)])
    message = str(error.value)
    assert f"HTTP {status}" in message and "MY_KEY" in message and KEY not in message
    assert len(endpoint.requests) <= 2  # no further requests once the first answer said 401/404
    assert KEY not in caplog.text and KEY not in repr(client)


def test_wrong_path_gives_a_base_url_hint():
    with StandInEndpoint(lambda body, count: completion("x")) as endpoint:
        client = ChatClient(endpoint.base_url.removesuffix("/v1"), "m")
        with pytest.raises(EndpointError, match="ends in /v1"):
            client.chat_many([conversation("x")])[0]


def test_requests_run_concurrently_up_to_the_limit():
    # Three requests must be in flight together to pass the barrier; a serial client would time out.
    barrier = threading.Barrier(3, timeout=10)

    def respond(body, count):
        if body["messages"][-1]["content"] in ("0", "1", "2"):
            barrier.wait()
        return completion("ok")

    with StandInEndpoint(respond) as endpoint:
        replies = client_for(endpoint, concurrency=3).chat_many([conversation(str(i)) for i in range(9)])
    assert all(r.ok for r in replies)
    assert endpoint.max_in_flight == 3


def test_exception_in_on_reply_cancels_the_rest():
    def stop(index, reply):
        raise KeyboardInterrupt

    with StandInEndpoint(lambda body, count: completion("ok")) as endpoint:
        client = client_for(endpoint, concurrency=2)
        with pytest.raises(KeyboardInterrupt):
            client.chat_many([conversation(str(i)) for i in range(30)], on_reply=stop)
    assert len(endpoint.requests) < 30


def test_retry_after_is_honoured():
    def respond(body, count):
        return Response(429, {"error": "slow down"}, headers={"Retry-After": "1"}) if count == 0 else completion("ok")

    with StandInEndpoint(respond) as endpoint:
        started = time.monotonic()
        reply = client_for(endpoint).chat_many([conversation("x")])[0]
    assert reply.ok and reply.requests == 2 and time.monotonic() - started >= 1.0


def test_endpoint_failures_are_counted_and_stop_past_the_threshold():
    with StandInEndpoint(lambda body, count: Response(500, {"error": "down"})) as endpoint:
        client = client_for(endpoint, max_retries=0, concurrency=1, max_failed_requests=3)
        with pytest.raises(EndpointFailures) as error:
            client.chat_many([conversation(str(i)) for i in range(20)])
    assert len(endpoint.requests) == 4  # the fourth failure is one too many: nothing more is asked
    message = str(error.value)
    assert "4 requests" in message and endpoint.base_url in message and "4 HTTP 500" in message
    assert "Stopped early" in message and "rerun" in message


def test_raise_if_failed_names_endpoint_counts_and_kinds_never_the_key():
    def respond(body, count):
        text = body["messages"][-1]["content"]
        if text == "bad":
            return Response(503, {"error": f"down, key {KEY}"})
        return completion("ok") if text == "fine" else Response(200, "not json")

    with StandInEndpoint(respond) as endpoint:
        client = client_for(endpoint, max_retries=0)
        client.raise_if_failed("judge")  # nothing failed yet
        replies = client.chat_many([conversation("fine"), conversation("bad"), conversation("garbled")])
    assert [r.ok for r in replies] == [True, False, False]
    with pytest.raises(EndpointFailures) as error:
        client.raise_if_failed("judge")
    message = str(error.value)
    assert message.startswith("judge: 2 requests to " + endpoint.base_url)
    assert "1 HTTP 503" in message and "1 malformed response" in message and "rerun" in message
    assert KEY not in message and KEY not in replies[1].error


def test_probe_lists_models_and_stops_on_a_dead_endpoint_or_refused_key():
    with StandInEndpoint(lambda body, count: completion("x")) as endpoint:
        assert client_for(endpoint).probe() == ["teacher-model"]
    with (
        StandInEndpoint(lambda body, count: completion("x"), models=Response(401, {"error": "no"})) as endpoint,
        pytest.raises(EndpointError, match="HTTP 401"),
    ):
        client_for(endpoint).probe()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EndpointError, match=f"127.0.0.1:{port}/v1 cannot be reached"):
        ChatClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=0).probe()


def test_safe_url_drops_credentials():
    assert safe_url("http://user:pw@host:8000/v1") == "http://host:8000/v1"
    assert safe_url("http://host:8000/v1") == "http://host:8000/v1"


def test_from_section_reads_settings_and_environment(monkeypatch):
    from medcritical.distill.config import OpenAITeacher

    section = OpenAITeacher(
        concurrency=3, timeout_s=9, max_retries=1, max_failed_requests=4, extra_body={"stop": ["x"]}
    )
    monkeypatch.delenv("MEDCRITICAL_TEACHER_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="MEDCRITICAL_TEACHER_BASE_URL"):
        ChatClient.from_section(section, "MEDCRITICAL_TEACHER")
    monkeypatch.setenv("MEDCRITICAL_TEACHER_BASE_URL", "http://teacher:8000/v1")
    monkeypatch.setenv("MEDCRITICAL_TEACHER_MODEL", "QwQ-32B")
    monkeypatch.setenv("MEDCRITICAL_TEACHER_API_KEY", KEY)
    client = ChatClient.from_section(section, "MEDCRITICAL_TEACHER")
    assert (client.base_url, client.model, client.concurrency, client.timeout_s) == (
        "http://teacher:8000/v1",
        "QwQ-32B",
        3,
        9,
    )
    assert client.extra_body == {"stop": ["x"]} and client._api_key == KEY and KEY not in repr(client)
    assert (client.max_retries, client.max_failed_requests) == (1, 4)


@pytest.mark.parametrize(
    "body",
    [
        {"id": "x", "object": "chat.completion", "choices": []},
        {"id": "x", "object": "chat.completion"},
        {"id": "x", "object": "chat.completion", "choices": None},
        {"id": "x", "object": "chat.completion", "choices": [{"index": 0}]},
        [1, 2],
    ],
    ids=["empty-choices", "no-choices", "null-choices", "no-message", "a-list"],
)
def test_a_200_without_choices_is_an_endpoint_failure_never_a_crash(body):
    with StandInEndpoint(lambda body_, count: Response(200, body)) as endpoint:
        client = client_for(endpoint, max_retries=0)
        replies = client.chat_many([conversation("a"), conversation("b")])
    assert all(not r.ok and r.endpoint_failed and r.error.startswith("malformed response") for r in replies)
    with pytest.raises(EndpointFailures, match="2 malformed response"):
        client.raise_if_failed("distill")


def test_an_endpoint_refusing_every_request_is_an_error_not_rejected_attempts():
    refuse = Response(400, {"error": "temperature must be at most 1.0"})
    with StandInEndpoint(lambda body, count: refuse) as endpoint:
        client = client_for(endpoint)
        with pytest.raises(EndpointError, match=r"no usable reply to any of 3 requests \(3 x HTTP 400: .*temperature"):
            client.chat_many([conversation(str(i)) for i in range(3)])
    # Fewer refusals than stop a call at once still end the step when nothing usable came back.
    with StandInEndpoint(lambda body, count: refuse) as endpoint:
        client = client_for(endpoint)
        replies = client.chat_many([conversation("only")])
        assert replies[0].error.startswith("HTTP 400")
        with pytest.raises(EndpointError, match="no usable reply to any of 1 request "):
            client.raise_if_failed("distill")


def test_all_empty_replies_are_an_endpoint_failure_but_some_are_answers():
    with StandInEndpoint(lambda body, count: completion("")) as endpoint:
        client = client_for(endpoint)
        with pytest.raises(EndpointError, match="3 x an empty reply"):
            client.chat_many([conversation(str(i)) for i in range(3)])

    def some(body, count):
        return completion("" if body["messages"][-1]["content"] != "good" else "答案：A")

    with StandInEndpoint(some) as endpoint:
        client = client_for(endpoint)
        replies = client.chat_many([conversation("good")] + [conversation(str(i)) for i in range(5)])
        client.raise_if_failed("distill")  # one usable reply: the empty ones are answers about their requests
    assert sum(bool(r.content) for r in replies) == 1


def test_a_key_echoed_by_the_server_is_masked_in_replies_and_errors(monkeypatch):
    from medcritical.io.jsonl import append_jsonl, write_jsonl

    def echo(body, count):
        if body["messages"][-1]["content"] == "refuse":
            return Response(400, {"error": f"bad request from key {KEY}"})
        return completion(f"your key is {KEY}", f"thinking about {KEY}")

    with StandInEndpoint(echo) as endpoint:
        client = client_for(endpoint)
        ok, refused = client.chat_many([conversation("hi"), conversation("refuse")])
    assert KEY not in ok.content and "***" in ok.content and KEY not in ok.reasoning_content
    assert KEY not in refused.error and "***" in refused.error
    # Whatever reaches a file through io.jsonl has every configured secret masked, even one no client
    # has seen yet (the S3 secret key in the environment).
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-0123456789")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        append_jsonl([{"reply": f"{KEY} and aws-secret-0123456789"}], Path(tmp) / "a.jsonl")
        write_jsonl([{"reply": f'quoted "{KEY}"'}], Path(tmp) / "b.jsonl")
        text = (Path(tmp) / "a.jsonl").read_text() + (Path(tmp) / "b.jsonl").read_text()
    assert KEY not in text and "aws-secret-0123456789" not in text and text.count("***") == 3


def test_a_teacher_echoing_its_key_leaves_it_in_no_file(bundled, tmp_path, monkeypatch):
    """distill_raw.jsonl, rejected.jsonl, sft.jsonl and the statistics: the key a server echoes is masked."""
    from medcritical.distill.run import distill
    from tests.test_distill_openai import KEY as TEACHER_KEY
    from tests.test_distill_openai import config_for, is_trace_prompt

    monkeypatch.setenv("MEDCRITICAL_TEACHER_API_KEY", TEACHER_KEY)
    questions = bundled[:2]

    def echo(body, count):
        if not is_trace_prompt(body):
            return completion(f"模板 {TEACHER_KEY}")
        text = body["messages"][-1]["content"]
        if questions[0].question in text:
            return completion(f"<think>推理 {TEACHER_KEY}</think>\n答案：{questions[0].answer}")
        return Response(400, {"error": f"refused for {TEACHER_KEY}"})

    with StandInEndpoint(echo) as endpoint:
        distill(config_for(endpoint, attempts=1, show_gold_answer=False), questions, tmp_path)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"distill_raw.jsonl", "rejected.jsonl", "sft.jsonl"} <= {p.name for p in written}
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert TEACHER_KEY not in text, path
    assert "***" in (tmp_path / "distill_raw.jsonl").read_text(encoding="utf-8")


@pytest.mark.parametrize("reply", ["", "我觉得对"], ids=["empty", "no-verdict"])
def test_a_judge_that_never_gives_a_verdict_fails_the_evaluation_not_0_of_0(
    reply, tmp_path, tiny_model, bundled, monkeypatch
):
    """Every judge reply empty (an endpoint failure) or without a verdict: no accuracy of 0 of 0, no report."""
    from medcritical.errors import StepError
    from medcritical.evaluation.evaluate import evaluate_model
    from medcritical.modeling.config import GenerationSection
    from tests.test_judge import paper_config

    monkeypatch.delenv("MEDCRITICAL_JUDGE_API_KEY", raising=False)
    expected = pytest.raises((EndpointError, StepError), match="no usable reply|no verdict for any of 3 questions")
    with StandInEndpoint(lambda body, count: completion(reply)) as endpoint, expected:
        evaluate_model(
            paper_config(endpoint.base_url),
            GenerationSection(max_new_tokens=4),
            bundled[:3],
            tiny_model,
            tmp_path,
            device="cpu",
        )
    assert not (tmp_path / "report.json").exists()
