"""The warm worker of `medcritical run` (medcritical.platform.warm_worker), real processes end to end: a worker
started as `medcritical run` starts it, and task-like processes that call through it as KFP's tasks do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medcritical.platform import warm_worker

REPO = Path(__file__).resolve().parents[1]
# A task as KFP's executor sets it up: logging to stdout in KFP's format, then one call through the worker.
TASK = textwrap.dedent(
    """
    import json, logging, os, sys
    logging.basicConfig(stream=sys.stdout, format="[KFP Executor %(levelname)s]: %(message)s", level=logging.INFO)
    from medcritical.platform import warm_worker
    from tests import warm_probes
    result = warm_worker.call(getattr(warm_probes, sys.argv[1]), *sys.argv[2:])
    print("RESULT " + json.dumps({"result": result, "task_pid": os.getpid()}))
    """
)


@pytest.fixture
def task_environment(monkeypatch):
    """The variables both the worker and its tasks start with (the tests' package importable; pytest's own
    PYTEST_CURRENT_TEST, which changes between a test's phases, left out: see `run_task`)."""
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("PROBE_VARIABLE", "from medcritical run")
    monkeypatch.delenv(warm_worker.WORKER_ENV, raising=False)


@pytest.fixture
def worker(task_environment, tmp_path, monkeypatch):
    """A warm worker that has imported the probes and json; its offer in this process's environment."""
    with (
        open(tmp_path / "worker.log", "w", encoding="utf-8") as log_file,
        warm_worker.offered(log_file, preload=("tests.warm_probes", "json")) as offer,
    ):
        monkeypatch.setenv(warm_worker.WORKER_ENV, offer[warm_worker.WORKER_ENV])
        yield int(offer[warm_worker.WORKER_ENV].split(":")[0])


def run_task(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A task calling `warm_probes.<args[0]>(*args[1:])`, in this process's environment or `env`."""
    env = {name: value for name, value in (env or os.environ).items() if name != "PYTEST_CURRENT_TEST"}
    return subprocess.run(
        [sys.executable, "-c", TASK, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )


def result_of(task: subprocess.CompletedProcess) -> dict:
    assert task.returncode == 0, task.stdout + task.stderr
    line = next(line for line in task.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_a_call_runs_in_a_fork_of_the_worker_with_the_tasks_output_folder_and_logging(worker, tmp_path):
    task = run_task("where", "hello", cwd=tmp_path)
    answer = result_of(task)
    result = answer["result"]
    assert result["ppid"] == worker and result["pid"] not in (worker, answer["task_pid"])
    assert result["cwd"] == str(tmp_path)
    assert result["probe_variable"] == "from medcritical run"
    assert result["json_loaded_before"]
    # The fork's output reaches the task's own stdout and stderr, its log lines in the task's format.
    assert "hello\n" in task.stdout and "[KFP Executor INFO]: logged: hello" in task.stdout
    assert "stderr: hello" in task.stderr


def test_a_user_error_in_the_fork_is_the_tasks_own_error_with_the_forks_traceback(worker, tmp_path):
    task = run_task("refuse", "learning_rate", cwd=tmp_path)
    assert task.returncode == 1
    last = task.stderr.strip().splitlines()[-1]
    assert last == "medcritical.errors.InputError: learning_rate is not a number: fix it in the recipe"
    assert "(in the warm worker's fork)" in task.stderr and "in refuse" in task.stderr


def test_an_exception_that_cannot_be_pickled_still_names_its_type_and_text(worker, tmp_path):
    task = run_task("raise_unpicklable", cwd=tmp_path)
    assert task.returncode == 1
    assert "tests.warm_probes.Unpicklable: a/b" in task.stderr.strip().splitlines()[-1]


def test_sys_exit_in_the_fork_is_the_tasks_exit_status(worker, tmp_path):
    assert run_task("exit_with", "3", cwd=tmp_path).returncode == 3


def test_a_fork_killed_ends_the_task_with_an_error_not_a_result(worker, tmp_path):
    task = run_task("die", cwd=tmp_path)
    assert task.returncode == 1
    assert "WorkerLost" in task.stderr and "ended without a result" in task.stderr


def test_the_fork_dies_with_the_task(worker, tmp_path):
    pid_file = tmp_path / "fork.pid"
    env = {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}
    task = subprocess.Popen([sys.executable, "-c", TASK, "sleep_forever", str(pid_file)], cwd=tmp_path, env=env)
    try:
        fork = int(wait_for(lambda: pid_file.is_file() and pid_file.read_text(), "the fork's pid file"))
    except AssertionError:
        task.kill()
        raise
    assert_stops_with(task, fork, "the fork to stop after its task was killed")


def test_a_task_started_by_a_shell_is_served_though_the_shell_set_its_own_variables(
    task_environment, tmp_path, monkeypatch
):
    """KFP starts each task with `sh -ec`, which sets PWD (and may set SHLVL, _) for the task; in a container no
    shell started `medcritical run`, so the worker has none of them (the cluster tier's demo Job met this)."""
    for name in ("PWD", "OLDPWD", "SHLVL", "_"):
        monkeypatch.delenv(name, raising=False)
    with (
        open(tmp_path / "worker.log", "w", encoding="utf-8") as log_file,
        warm_worker.offered(log_file, preload=("tests.warm_probes",)) as offer,
    ):
        env = dict(os.environ) | offer  # the worker started in this test's phase: the same PYTEST_CURRENT_TEST
        command = ["sh", "-ec", 'exec "$0" -c "$1" where x', sys.executable, TASK]
        task = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    answer = result_of(task)
    assert answer["result"]["pid"] != answer["task_pid"], task.stdout
    assert answer["result"]["cwd"] == str(tmp_path)


def test_a_task_whose_environment_differs_runs_in_its_own_process(worker, tmp_path):
    task = run_task("where", "x", cwd=tmp_path, env={**os.environ, "PROBE_VARIABLE": "changed"})
    answer = result_of(task)
    assert answer["result"]["pid"] == answer["task_pid"]
    assert answer["result"]["probe_variable"] == "changed"
    assert "warm worker not used (the task's environment differs from the worker's in PROBE_VARIABLE)" in task.stdout


def test_a_worker_whose_imports_start_a_thread_declines_and_tasks_run_on_their_own(task_environment, tmp_path):
    with (
        open(tmp_path / "worker.log", "w", encoding="utf-8") as log_file,
        warm_worker.offered(log_file, preload=("tests.warm_probes_threaded",)) as offer,
    ):
        task = run_task("where", "x", cwd=tmp_path, env={**os.environ, **offer})
    answer = result_of(task)
    assert answer["result"]["pid"] == answer["task_pid"]
    assert "an import started Python threads (left-running)" in task.stdout
    assert "declined" in (tmp_path / "worker.log").read_text(encoding="utf-8")


def test_without_an_offer_or_with_a_stopped_worker_the_call_runs_here(task_environment, tmp_path):
    answer = result_of(run_task("where", "x", cwd=tmp_path))
    assert answer["result"]["pid"] == answer["task_pid"]
    stopped = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    offer = f"{stopped.stdout.strip()}:{tmp_path / 'gone.sock'}"
    task = run_task("where", "x", cwd=tmp_path, env={**os.environ, warm_worker.WORKER_ENV: offer})
    answer = result_of(task)
    assert answer["result"]["pid"] == answer["task_pid"]
    assert "stopped before it was ready" in task.stdout


def test_the_worker_stops_when_the_process_that_started_it_dies(task_environment, tmp_path):
    starter = textwrap.dedent(
        """
        import sys, time
        from medcritical.platform import warm_worker
        with warm_worker.offered(sys.stdout, preload=("json",)) as offer:
            print(offer[warm_worker.WORKER_ENV].split(":")[0], flush=True)
            time.sleep(3600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    assert_stops_with(parent, worker_pid, "the worker to stop after medcritical run was killed")


def assert_stops_with(killed: subprocess.Popen, pid: int, what: str) -> None:
    """Process `pid` runs, and stops once `killed` is killed (SIGKILL: no handler of its own runs)."""
    try:
        assert warm_worker._alive(pid)
        killed.send_signal(signal.SIGKILL)
        wait_for(lambda: not warm_worker._alive(pid), what)
    finally:
        killed.kill()
        killed.wait()


def wait_for(condition, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
