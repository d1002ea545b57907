"""ChatClient against a scripted OpenAI-compatible stand-in on 127.0.0.1: replies, retries, errors, concurrency."""

import logging
import socket
import threading

import pytest

from medcritical.llm_client import ChatClient, EndpointError
from tests.fixtures.chat_endpoint import Response, StandInEndpoint, completion

KEY = "sk-test-very-secret-0123456789"
FAST = dict(backoff_s=0.01, max_backoff_s=0.05)  # real backoff, tiny delays


def conversation(text):
    return [{"role": "user", "content": text}]


def client_for(endpoint, **kwargs):
    settings = dict(api_key=KEY, concurrency=4, timeout_s=5.0, max_retries=3, **FAST)
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
        reply = client_for(endpoint, max_retries=2).chat(conversation("x"))
    assert not reply.ok and reply.requests == 3
    assert "HTTP 503" in reply.error and "gave up after 3 attempts" in reply.error
    assert len(endpoint.requests) == 3


def test_client_errors_other_than_auth_are_not_retried():
    with StandInEndpoint(lambda body, count: Response(400, {"error": "prompt too long"})) as endpoint:
        reply = client_for(endpoint).chat(conversation("x"))
    assert reply.requests == 1 and "HTTP 400" in reply.error and "prompt too long" in reply.error
    assert len(endpoint.requests) == 1


def test_malformed_success_body_is_recorded():
    def respond(body, count):
        return Response(200, "this is not json" if body["messages"][-1]["content"] == "a" else {"choices": []})

    with StandInEndpoint(respond) as endpoint:
        replies = client_for(endpoint).chat_many([conversation("a"), conversation("b")])
    assert all(not r.ok and r.error.startswith("malformed response") for r in replies)


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
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, **FAST)
    reply = client.chat(conversation("x"))
    assert not reply.ok and "connection error" in reply.error and reply.requests == 3


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_stop_at_once_without_leaking_the_key(status, caplog):
    caplog.set_level(logging.DEBUG)
    # The server echoes the key in its error text, as some proxies do; the client must mask it.
    respond = lambda body, count: Response(status, {"error": f"bad key {KEY}"})
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
        client = ChatClient(endpoint.base_url.removesuffix("/v1"), "m", **FAST)
        with pytest.raises(EndpointError, match="ends in /v1"):
            client.chat(conversation("x"))


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


def test_backoff_doubles_with_jitter_and_honours_retry_after():
    client = ChatClient("http://x/v1", "m", backoff_s=1.0, max_backoff_s=10.0)
    for retry, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (5, 10), (5, 10)]):
        delays = [client._backoff(retry, None) for _ in range(50)]
        assert all(low <= d <= high for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert client._backoff(0, 7.0) == 7.0
    assert client._backoff(0, 1000.0) == 10.0  # a huge Retry-After is capped


def test_from_section_reads_settings_and_environment(monkeypatch):
    from medcritical.distill.config import OpenAITeacher

    section = OpenAITeacher(concurrency=3, timeout_s=9, max_retries=1, extra_body={"stop": ["x"]})
    monkeypatch.delenv("MEDCRITICAL_TEACHER_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="MEDCRITICAL_TEACHER_BASE_URL"):
        ChatClient.from_section(section, "MEDCRITICAL_TEACHER")
    monkeypatch.setenv("MEDCRITICAL_TEACHER_BASE_URL", "http://teacher:8000/v1")
    monkeypatch.setenv("MEDCRITICAL_TEACHER_MODEL", "QwQ-32B")
    monkeypatch.setenv("MEDCRITICAL_TEACHER_API_KEY", KEY)
    client = ChatClient.from_section(section, "MEDCRITICAL_TEACHER")
    assert (client.base_url, client.model, client.concurrency, client.timeout_s) == ("http://teacher:8000/v1", "QwQ-32B", 3, 9)
    assert client.extra_body == {"stop": ["x"]} and client._api_key == KEY and KEY not in repr(client)
