"""Both judge protocols end to end against a real vLLM OpenAI-compatible server, resume included.

The student is the tiny model (transformers), the judge the tiny model served by vLLM's CPU build.
Random text on both sides, so what is checked is the protocol: the 1/2 verdict held by structured
outputs (no parser) or a logit bias (with the parser, read from the `reasoning` field), the rubric's
strict verdict line never guessed, the counts beside the accuracy, and a rerun after a crash that
judges only the missing rows.
"""

import json

import pytest

from medcritical.evaluation.config import EvaluateSection, JudgeSection
from medcritical.evaluation.evaluate import evaluate_model
from medcritical.evaluation.judge import JUDGEMENTS_JSONL
from medcritical.modeling.config import GenerationSection
from medcritical.modeling.llm_client import ChatClient, EndpointError

pytestmark = pytest.mark.vllm


@pytest.fixture
def asked(monkeypatch):
    """How many conversations the judge sent, per call (the real client, observed)."""
    calls = []
    original = ChatClient.achat_many

    async def observed(self, conversations, **kwargs):
        calls.append(len(conversations))
        return await original(self, conversations, **kwargs)

    monkeypatch.setattr(ChatClient, "achat_many", observed)
    return calls


def judge_config(server, protocol, **judge):
    return EvaluateSection(
        protocol=protocol,
        judge=JudgeSection(base_url=server.base_url, model=server.model, timeout_s=120, max_retries=1, **judge),
    )


def test_judge_paper_structured_outputs_and_resume_after_a_crash(
    plain_vllm_server, tiny_model, bundled, tmp_path, asked
):
    questions = bundled[:6]
    config = judge_config(plain_vllm_server, "judge-paper")
    report = evaluate_model(config, GenerationSection(), questions, tiny_model, tmp_path, device="cpu")
    assert (report["protocol"], report["n"], report["dropped"], report["questions"]) == ("judge-paper", 6, 0, 6)
    assert report["student_sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 450}
    rows = [json.loads(line) for line in (tmp_path / JUDGEMENTS_JSONL).read_text().splitlines()]
    assert len(rows) == 6 and {r["reply"] for r in rows} <= {"1", "2"} and all(r["error"] is None for r in rows)
    assert report["correct"] == sum(r["reply"] == "1" for r in rows) and asked == [6]

    # A crash tore the last verdict mid-write and lost the one before: the rerun judges exactly those.
    lines = (tmp_path / JUDGEMENTS_JSONL).read_text().splitlines()
    (tmp_path / JUDGEMENTS_JSONL).write_text("\n".join(lines[:4]) + "\n" + lines[5][:10])
    again = evaluate_model(config, GenerationSection(), questions, tiny_model, tmp_path, device="cpu")
    assert asked == [6, 2] and (again["n"], again["dropped"]) == (6, 0)
    assert "protocol `judge-paper`" in (tmp_path / "report.md").read_text()


def test_judge_paper_logit_bias_through_the_reasoning_parser(vllm_server, vllm_model, tiny_model, bundled, tmp_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(vllm_model).convert_tokens_to_ids(["1", "2"])
    config = judge_config(
        vllm_server, "judge-paper", verdict_constraint="none", extra_body={"logit_bias": {str(i): 100 for i in ids}}
    )
    report = evaluate_model(config, GenerationSection(), bundled[:4], tiny_model, tmp_path, device="cpu")
    assert (report["n"], report["dropped"]) == (4, 0)


def test_judge_rubric_never_guesses_a_verdict(vllm_server, tiny_model, bundled, tmp_path):
    """The tiny model's replies are all reasoning (the server's parser takes everything), so every reply's content
    is empty: that is an endpoint failure naming the endpoint, never 4 verdicts guessed or an accuracy over none.
    (Replies with text but no verdict line are dropped and counted: tests/test_judge.py.)"""
    config = judge_config(vllm_server, "judge-rubric", max_tokens=16, max_unusable_share=1.0)
    with pytest.raises(EndpointError, match=r"gave no usable reply to any of 4 requests \(4 x an empty reply\)"):
        evaluate_model(config, GenerationSection(max_new_tokens=8), bundled[:4], tiny_model, tmp_path, device="cpu")
    assert not (tmp_path / "report.json").exists()
