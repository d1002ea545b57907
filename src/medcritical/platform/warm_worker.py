"""The warm worker of `medcritical run`: one Python that imports torch, transformers, TRL and the stages once and
forks a copy of itself for each pipeline task's stage.

KFP's local runner starts every task as a fresh Python (`python -m kfp.dsl.executor_main`), and a task that trains
or generates spent 5-10 s importing torch, transformers and TRL before its first step
(benchmarks/results/pipeline_e2e-overhead.md). With the worker, the task's own process stays light: it sends the
stage call here (`call`), a fork runs it with the task's stdout, stderr, working folder, environment and logging,
and the result, or the exception, goes back to the task, which goes on as KFP expects (metrics, executor output).

Why a fork is safe here: before it serves, the worker has only imported. It has started no Python thread,
initialised no CUDA and run no torch operation, and it checks the first two (otherwise it declines, and every task
runs in its own process as without it). PyTorch's DataLoader workers are forked from a process in the same state.

A task uses the worker only when `medcritical run` offers one (WORKER_ENV) and the task's environment is the one the
worker imported under. A fork lives as long as the task that asked for it: when the task's process dies, the fork
and anything it started are killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Set by `medcritical run` for its tasks: "<worker pid>:<socket path>".
WORKER_ENV = "MEDCRITICAL_WARM_WORKER"
# What a task imports before it trains or generates (the stages import the heavy libraries in their functions).
PRELOAD = (
    "medcritical.platform.kfp_runtime",
    "medcritical.orchestration.runner",
    "medcritical.training.sft",
    "medcritical.training.dpo",
    "medcritical.training.common",
    "medcritical.evaluation.evaluate",
    "medcritical.selfplay.run",
    "medcritical.modeling.generation",
    "transformers:AutoModelForCausalLM",
    "transformers:AutoTokenizer",
    "transformers.trainer_utils",
    "peft:LoraConfig",
)
# Variables a task's environment may differ in (any other difference and the task runs on its own): ours; the one
# KFP's runner puts on each task's command line (it tells kfp's own import which parts to skip); those the shell
# that KFP starts each task with (`sh -ec`) sets for itself: the working folder (the fork takes the task's own),
# the shell's depth and last command (in a container, where no shell started `medcritical run`, PWD is set for
# the task only); the terminal's size, which a parent process may set after the worker started (pytest does).
NOT_COMPARED = frozenset({WORKER_ENV, "_KFP_RUNTIME", "PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES"})
# How long a task waits for the worker to finish its imports (they take 10-20 s; a loaded machine is slower).
READY_TIMEOUT_S = 300.0
_LENGTH = 8  # bytes of the length that comes before each message


class WorkerLost(RuntimeError):
    """The fork running a task's stage ended without sending a result (killed: out of memory, a signal)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in the fork, shown as the cause of the same exception in the task."""

    def __str__(self) -> str:
        return "\n\n(in the warm worker's fork)\n" + self.args[0]


# -- The task's side ----------------------------------------------------------------------------------


def call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function(*args, **kwargs)` in a fork of the warm worker when `medcritical run` offers one, else here.

    The function is sent by reference (module and name), so it must be importable; its arguments and result are
    pickled. Whatever the reason the worker cannot take the call, the call runs here, and the log says why."""

    def here(reason) -> T:
        log.info("warm worker not used (%s): running in this task's own process", reason)
        return function(*args, **kwargs)

    offer = os.environ.get(WORKER_ENV)
    if not offer:
        return function(*args, **kwargs)
    try:
        request = pickle.dumps((function, args, kwargs, _task_state()))
        connection = _connect(offer)
    except (OSError, pickle.PicklingError, TypeError, AttributeError, WorkerUnavailable) as e:
        return here(e)
    sys.stdout.flush()  # what the task printed so far comes before what the fork prints
    sys.stderr.flush()
    with connection:
        _send(connection, request, fds=[sys.stdout.fileno(), sys.stderr.fileno()])
        reply = _receive(connection)
    if reply is None:
        raise WorkerLost(
            f"the warm worker's fork running {function.__qualname__} ended without a result: it was killed "
            "(out of memory? a signal?); the lines above are its last output. Run again: finished steps are kept"
        )
    kind, *rest = pickle.loads(reply)
    if kind == "declined":
        return here(rest[0])
    if kind == "returned":
        return rest[0]
    if kind == "exited":
        raise SystemExit(rest[0])
    exception, remote_traceback = rest
    raise exception from RemoteTraceback(remote_traceback)


class WorkerUnavailable(Exception):
    """The offered worker cannot take calls: it stopped, declined to serve or never got ready."""


def _connect(offer: str) -> socket.socket:
    """A connection to the offered worker, once it has finished its imports."""
    pid_text, _, path = offer.partition(":")
    declined = path + ".declined"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if os.path.exists(declined):
            with open(declined, encoding="utf-8") as file:
                raise WorkerUnavailable(file.read().strip())
        if os.path.exists(path):
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(path)
                return connection
            except OSError:
                connection.close()
                if not _alive(int(pid_text)):
                    raise WorkerUnavailable(f"the worker (pid {pid_text}) has stopped") from None
                raise
        if not _alive(int(pid_text)):
            raise WorkerUnavailable(f"the worker (pid {pid_text}) stopped before it was ready")
        if time.monotonic() > deadline:
            raise WorkerUnavailable(f"the worker was not ready after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, stopped but not yet collected by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _task_state() -> dict:
    """What the fork takes over from the task: its folder, environment and logging."""
    root = logging.getLogger()
    handlers = [
        (_fileno(handler.stream), handler.formatter._fmt if handler.formatter else None, handler.level)
        for handler in root.handlers
        if isinstance(handler, logging.StreamHandler) and _fileno(handler.stream) in (1, 2)
    ]
    return {"cwd": os.getcwd(), "environ": dict(os.environ), "log_level": root.level, "log_handlers": handlers}


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


# -- The worker's side --------------------------------------------------------------------------------


@contextlib.contextmanager
def offered(log_file, preload: tuple[str, ...] = PRELOAD) -> Iterator[dict[str, str]]:
    """Start a worker that imports `preload`; yield the variables that offer it to tasks; stop it at the end.

    The worker takes this process's environment; its own messages go to `log_file`."""
    folder = tempfile.mkdtemp(prefix="medcritical-warm-")
    path = os.path.join(folder, "worker.sock")
    environment = {name: value for name, value in os.environ.items() if name != WORKER_ENV}
    process = subprocess.Popen(
        [sys.executable, "-m", "medcritical.platform.warm_worker", str(os.getpid()), path, *preload],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=environment,
    )
    try:
        yield {WORKER_ENV: f"{process.pid}:{path}"}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def serve(parent: int, path: str, preload: tuple[str, ...]) -> None:
    """Import `preload`, then fork once per connection on the socket `path`, until this process or its `parent`
    (`medcritical run`) stops."""
    _die_with_parent(parent)
    environment = dict(os.environ)
    try:
        for name in preload:
            module, _, attribute = name.partition(":")
            imported = importlib.import_module(module)
            if attribute:
                getattr(imported, attribute)
        reason = _unsafe_to_fork()
    except Exception as e:  # the tasks run in their own process and meet the same error there, with its traceback
        reason = f"importing {name} failed: {type(e).__name__}: {e}"
    if reason:
        with open(path + ".declined", "w", encoding="utf-8") as file:
            file.write(reason)
        print(f"warm worker: declined: {reason}", flush=True)
        return
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".part")
    server.listen(16)
    os.rename(path + ".part", path)  # tasks connect only once it listens
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the forks are collected by the system
    while True:
        connection, _ = server.accept()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the stage's own subprocesses are waited for
            os._exit(_run_in_fork(connection, environment))
        connection.close()


def _die_with_parent(parent: int) -> None:
    """Have Linux stop this worker when its parent, `medcritical run`, ends, however it ends."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the line above
        sys.exit(0)


def _unsafe_to_fork() -> str | None:
    """Why forking this process could hang or break its copies; None when it cannot."""
    if threading.active_count() > 1:
        names = ", ".join(thread.name for thread in threading.enumerate() if thread is not threading.main_thread())
        return f"an import started Python threads ({names}), which a fork would not copy"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "an import initialised CUDA, which a forked process cannot use"
    return None


def _run_in_fork(connection: socket.socket, environment: dict[str, str]) -> int:
    """Take over one task's request on `connection`, run it, send back what came of it; the exit status."""
    request, fds = _receive_request(connection)
    function, args, kwargs, state = pickle.loads(request)
    differs = sorted(
        name
        for name in (state["environ"].keys() | environment.keys()) - NOT_COMPARED
        if state["environ"].get(name) != environment.get(name)
    )
    if differs:
        reason = f"the task's environment differs from the worker's in {', '.join(differs)}"
        _send(connection, pickle.dumps(("declined", reason)))
        return 0
    _take_over_task(fds, state)
    _kill_when_task_ends(connection)
    log.info("running in a fork (pid %d) of the warm worker (its imports done once for the whole run)", os.getpid())
    try:
        reply = ("returned", function(*args, **kwargs))
    except SystemExit as e:
        reply = ("exited", e.code)
    except BaseException as e:
        reply = ("raised", e, traceback.format_exc())
    sys.stdout.flush()
    sys.stderr.flush()
    _send(connection, _pickled_reply(reply))
    return 0


def _take_over_task(fds: list[int], state: dict) -> None:
    """Become the task's process in what the stage sees: its stdout and stderr, folder, environment, logging."""
    os.setpgid(0, 0)  # a group of its own: killed together with what the stage starts
    for target, fd in zip((1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(state["cwd"])
    os.environ.clear()
    os.environ.update(state["environ"])
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for fd, fmt, level in state["log_handlers"]:
        handler = logging.StreamHandler(sys.stdout if fd == 1 else sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        handler.setLevel(level)
        root.addHandler(handler)
    root.setLevel(state["log_level"])


def _kill_when_task_ends(connection: socket.socket) -> None:
    """Stop this fork and its process group when the task's process goes away (its end of the socket closes)."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            connection.recv(1)
        os.killpg(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="task-watch", daemon=True).start()


def _pickled_reply(reply: tuple) -> bytes:
    """The reply as bytes; an exception that does not survive pickling is sent as its type, text and traceback."""
    try:
        data = pickle.dumps(reply)
        pickle.loads(data)
        return data
    except Exception as e:
        if reply[0] != "raised":
            reply = ("raised", e, traceback.format_exc())
            with contextlib.suppress(Exception):
                return pickle.dumps(reply)
        error, remote_traceback = reply[1], reply[2]
        stand_in = RuntimeError(f"{type(error).__module__}.{type(error).__qualname__}: {error}")
        return pickle.dumps(("raised", stand_in, remote_traceback))


# -- Messages: a length, then the bytes; the task's stdout and stderr travel with its request ------------


def _send(connection: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    header = len(data).to_bytes(_LENGTH, "big")
    if fds:
        socket.send_fds(connection, [header], fds)
    else:
        connection.sendall(header)
    connection.sendall(data)


def _receive(connection: socket.socket) -> bytes | None:
    header = _exactly(connection, _LENGTH)
    return None if header is None else _exactly(connection, int.from_bytes(header, "big"))


def _receive_request(connection: socket.socket) -> tuple[bytes, list[int]]:
    header, fds, _, _ = socket.recv_fds(connection, _LENGTH, 2)
    rest = _exactly(connection, _LENGTH - len(header)) or b""
    return _exactly(connection, int.from_bytes(header + rest, "big")) or b"", fds


def _exactly(connection: socket.socket, size: int) -> bytes | None:
    """`size` bytes from `connection`; None when it closes first."""
    chunks, missing = [], size
    while missing:
        chunk = connection.recv(min(missing, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], tuple(sys.argv[3:]))
