"""distill.backend: vllm-server against real vLLM: the step starts a vLLM OpenAI server over the teacher
model, health-checks it, distills through the openai client, keeps the server's log in the step folder and
stops the server on the way out, also when the step is killed (SIGKILL) or the server cannot start."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.fixtures.vllm import REPO, run_in_vllm, vllm_env

pytestmark = pytest.mark.vllm
SCRIPT = REPO / "tests" / "vllm_scripts" / "served_teacher.py"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        # A zombie (exited, not yet reaped by its new parent) is gone for our purpose.
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_distill_through_a_server_started_in_the_step(vllm_python, vllm_model, tmp_path):
    run_in_vllm(vllm_python, SCRIPT, "run", vllm_model, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    stats = result["stats"]
    # Asked through the openai backend at the server's local address; the model is named by its folder.
    assert stats["teacher"]["backend"] == "openai"
    assert stats["teacher"]["base_url"] == result["server"]["base_url"]
    assert result["server"]["base_url"].startswith("http://127.0.0.1:")
    assert stats["questions"] == 4 and stats["http_requests"] >= 8  # a template and a trace per question
    raw = [json.loads(line) for line in (tmp_path / "distill" / "distill_raw.jsonl").read_text().splitlines()]
    replies = [e["reply"] for e in raw if e.get("event") == "reply"]
    assert replies and all(r["error"] is None and r["completion_tokens"] >= 1 for r in replies)
    log = (tmp_path / "distill" / "teacher-server.log").read_text()
    assert "/health" in log and "/v1/chat/completions" in log  # the server's own log, in the step folder
    assert result["server_alive_after"] is False


def test_the_server_stops_when_the_step_is_killed(vllm_python, vllm_model, tmp_path):
    step = subprocess.run(
        [str(vllm_python), str(SCRIPT), "kill", str(vllm_model), str(tmp_path)],
        capture_output=True,
        text=True,
        env=vllm_env(),
        cwd=REPO,
        timeout=600,
    )
    assert step.returncode == -9, step.stderr[-3000:]
    pid = int((tmp_path / "server.pid").read_text())
    deadline = time.monotonic() + 60
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(1)
    assert not alive(pid), "the teacher's server outlived the killed step"


def test_a_server_that_cannot_start_is_a_clear_error(vllm_python, vllm_model, tmp_path):
    # distill.server.extra_args with an option the server does not know: it exits while starting.
    run_in_vllm(vllm_python, SCRIPT, "fail", vllm_model, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert "exited with code" in result["error"] and "teacher-server.log" in result["error"]
    assert (tmp_path / "distill" / "teacher-server.log").stat().st_size > 0
