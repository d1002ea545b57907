"""ChatClient against a real vLLM OpenAI-compatible server (the CPU build, a tiny random model).

The model writes random text, so these check plumbing and protocol: the probe, the fields read
(`reasoning` with the deepseek_r1 reasoning parser, `content` without it), usage, seeds, the 1/2
constraint of the judge, and the errors a real server gives for a wrong model or path.
"""

import pytest

from medcritical.modeling.llm_client import ChatClient, EndpointError

pytestmark = pytest.mark.vllm

QUESTION = [{"role": "user", "content": "问题：发热最常见的原因是什么？"}]


def test_probe_and_reasoning_field_with_the_parser(vllm_server):
    client = ChatClient(vllm_server.base_url, vllm_server.model, concurrency=4, timeout_s=120, max_retries=1)
    assert client.probe() == [vllm_server.model]
    replies = client.chat_many([QUESTION] * 3 + [QUESTION], temperature=0.8, max_tokens=12, seed=7)
    assert all(r.ok and not r.endpoint_failed and r.requests == 1 for r in replies)
    # The tiny model never closes </think>: vLLM's parser returns all of it as `reasoning`, content null.
    assert all(r.reasoning_content and r.content == "" for r in replies)
    assert all(r.completion_tokens == 12 and r.prompt_tokens > 0 and r.finish_reason == "length" for r in replies)
    assert replies[0].reasoning_content == replies[3].reasoning_content  # the seed reaches the server


def test_content_and_the_1_or_2_constraint_without_the_parser(plain_vllm_server):
    client = ChatClient(plain_vllm_server.base_url, plain_vllm_server.model, timeout_s=120, max_retries=1)
    free = client.chat_many([QUESTION], temperature=0.8, max_tokens=12, seed=1)[0]
    assert free.ok and free.content and free.reasoning_content == ""
    prompts = [[{"role": "user", "content": f"第{i}题：学生回答正确吗？输出1或2。"}] for i in range(8)]
    verdicts = client.chat_many(
        prompts, temperature=1.0, max_tokens=1, seed=3, structured_outputs={"choice": ["1", "2"]}
    )
    assert {r.content for r in verdicts} <= {"1", "2"}
    # vLLM 0.30 ignores the removed guided_choice field silently: unconstrained, hence not the default.
    loose = client.chat_many(prompts, temperature=1.0, max_tokens=1, seed=3, guided_choice=["1", "2"])
    assert {r.content for r in loose} - {"1", "2"}


def test_logit_bias_forces_the_verdict_token_with_the_parser(vllm_server, vllm_model):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(vllm_model).convert_tokens_to_ids(["1", "2"])
    client = ChatClient(vllm_server.base_url, vllm_server.model, timeout_s=120, max_retries=1)
    replies = client.chat_many(
        [QUESTION] * 4, temperature=1.0, max_tokens=1, seed=5, logit_bias={str(i): 100 for i in ids}
    )
    # Without </think> the parser files the token under `reasoning`; the judge reads either field.
    assert {r.content or r.reasoning_content for r in replies} <= {"1", "2"}


def test_wrong_model_or_path_stops_at_once(vllm_server):
    with pytest.raises(EndpointError, match="HTTP 404"):
        ChatClient(vllm_server.base_url, "no-such-model", max_retries=0).chat_many([QUESTION] * 5, max_tokens=2)
    wrong_path = vllm_server.base_url.removesuffix("/v1")
    with pytest.raises(EndpointError, match="ends in /v1"):
        ChatClient(wrong_path, vllm_server.model, max_retries=0).chat_many([QUESTION], max_tokens=2)
