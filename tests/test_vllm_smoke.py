"""The vLLM tier's plumbing: the CPU engine's OpenAI server answers a chat request for real."""

import json
import urllib.request

import pytest

pytestmark = pytest.mark.vllm


def test_served_tiny_model_answers_a_chat_request(vllm_server):
    body = json.dumps(
        {
            "model": vllm_server.model,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": "你好"}],
        }
    ).encode()
    request = urllib.request.Request(
        f"{vllm_server.base_url}/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.loads(response.read())
    choice = reply["choices"][0]
    assert reply["usage"]["completion_tokens"] >= 1
    # The reasoning parser is on: an output that never closes </think> comes back as reasoning.
    assert choice["message"].get("content") is not None or choice["message"].get("reasoning") is not None
