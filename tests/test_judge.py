"""The judge protocol: the tiny model answers without options, a judge endpoint grades.

The judge endpoint is a stand-in HTTP server on 127.0.0.1: the subject under test is our protocol
wiring (prompts, verdict parsing, resume, labelling), not a judge model's quality.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medcritical.evaluation.config import EvaluateConfig, JudgeConfig
from medcritical.evaluation.evaluate import evaluate_model
from medcritical.evaluation.judge import parse_verdict
from medcritical.modeling.config import GenerationConfig


@pytest.mark.parametrize(
    "reply,verdict",
    [("正确", True), ("错误", False), ("不正确", False), ("判断：正确", True), ("correct", True),
     ("Incorrect.", False), ("I think it is incorrect... no wait, correct", True), ("不知道", None)],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


@pytest.fixture
def judge_server():
    """Says 正确 when the reference contains 'A.', else 错误; records every prompt it was sent."""
    prompts = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            prompts.append(prompt)
            verdict = "正确" if "参考答案：A." in prompt else "错误"
            payload = json.dumps({"choices": [{"message": {"content": verdict}, "finish_reason": "stop"}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", prompts
    server.shutdown()


def test_judge_protocol_end_to_end_and_resume(tmp_path, tiny_model, bundled, judge_server):
    url, prompts = judge_server
    questions = bundled[:8]
    config = EvaluateConfig(protocol="judge", judge=JudgeConfig(base_url=url, model="judge"))
    report = evaluate_model(config, GenerationConfig(max_new_tokens=12), questions, tiny_model, tmp_path, device="cpu")

    expected = sum(q.answer.startswith("A") for q in questions)
    assert report["protocol"] == "judge" and report["n"] == 8 and report["correct"] == expected
    assert len(prompts) == 8
    # The student never saw the options; the judge saw the reference and explanation.
    outputs = [json.loads(line) for line in (tmp_path / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 8
    assert all("参考答案" in p and "解析" in p for p in prompts)
    assert "protocol `judge`" in (tmp_path / "report.md").read_text()

    # A rerun pays for no verdict twice.
    evaluate_model(config, GenerationConfig(max_new_tokens=12), questions, tiny_model, tmp_path, device="cpu")
    assert len(prompts) == 8


def test_judge_without_endpoint_says_which_setting(tmp_path, tiny_model, bundled, monkeypatch):
    monkeypatch.delenv("MEDCRITICAL_JUDGE_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="MEDCRITICAL_JUDGE_BASE_URL"):
        evaluate_model(EvaluateConfig(protocol="judge"), GenerationConfig(max_new_tokens=4), bundled[:2], tiny_model, tmp_path, device="cpu")
