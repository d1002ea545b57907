"""distill.backend: vllm-server for real, run by tests/test_vllm_served_teacher.py with the vLLM venv's python
(the step's own python starts the server, as in the inference image):

    python tests/vllm_scripts/served_teacher.py run MODEL OUT    # distill through a server started in the step
    python tests/vllm_scripts/served_teacher.py kill MODEL OUT   # the step is SIGKILLed mid-run
    python tests/vllm_scripts/served_teacher.py fail MODEL OUT   # a server that cannot start (a bad option)

Writes OUT/result.json (run, fail) or OUT/server.pid (kill) for the test to check.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from checks_common import questions


def config(model: str, extra_args: list[str]):
    from medcritical.distill.config import DistillSection, TeacherServer

    server = TeacherServer(max_model_len=2048, start_timeout_s=300, extra_args=extra_args)
    return DistillSection(
        backend="vllm-server",
        teacher_model=model,
        attempts=2,
        temperature=0.7,
        max_new_tokens=32,
        template_max_new_tokens=16,
        server=server,
    )


def main(mode: str, model: str, out: Path) -> None:
    import medcritical.modeling.vllm_server as vllm_server
    from medcritical.distill import run

    started = []
    start = vllm_server.start_vllm_server

    def recording_start(*args, **kwargs):  # the real start; the test needs the server's pid
        try:
            server = start(*args, **kwargs)
        except RuntimeError as e:
            started.append({"error": str(e)})
            raise
        started.append({"pid": server.process.pid, "base_url": server.base_url})
        (out / "server.pid").write_text(str(server.process.pid))
        return server

    vllm_server.start_vllm_server = recording_start
    if mode == "kill":

        def killed(self, *args, **kwargs):  # the step dies hard while the teacher is being asked
            os.kill(os.getpid(), signal.SIGKILL)

        run._Run.ask_until_done = killed
    result: dict = {}
    try:
        extra_args = ["--no-such-option"] if mode == "fail" else []
        result["stats"] = run.distill(config(model, extra_args), questions()[:4], out / "distill", seed=0)
    except RuntimeError as e:
        result["error"] = str(e)
    result["server"] = started[0]
    if "pid" in started[0]:
        try:
            os.kill(started[0]["pid"], 0)
            result["server_alive_after"] = True
        except ProcessLookupError:
            result["server_alive_after"] = False
    (out / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
