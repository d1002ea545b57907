"""`medcritical run`: the whole pipeline on this machine through KFP's local runner, every task a subprocess of this
Python, with a console a person can follow and a task's user error shown as one sentence."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from medcritical import storage
from medcritical.errors import UserError
from medcritical.orchestration.recipe import Recipe, RecipeError
from medcritical.orchestration.report import REPORT
from medcritical.orchestration.staging import join_uri
from medcritical.platform import warm_worker
from medcritical.platform.kfp_runtime import resolved_recipe_env
from medcritical.platform.pipeline_runner import pipeline_for, recipe_parameter

log = logging.getLogger(__name__)


def run_locally(recipe: Recipe, warm: bool = True) -> Path:
    """Run every step as a subprocess of this Python through KFP's local runner; return the report folder.

    KFP's runner prints every executor's input and output JSON; that goes to `pipeline.log` and the
    console shows the steps and what they report. With `warm`, every task's stage runs in a fork of one warm
    worker (medcritical.platform.warm_worker) instead of importing torch, transformers and TRL again in each
    task.
    """
    from kfp import local

    root = recipe.run.root
    if storage.is_s3(root):  # credentials, bucket and write permission, before any task starts
        storage.check_output(root, abort_abandoned=False)
    # KFP's local runner needs a local pipeline_root (an s3:// root silently becomes a folder "s3:"):
    # it only holds KFP's own small outputs; the steps write to run.output_dir themselves.
    kfp_root = Path(tempfile.mkdtemp(prefix="kfp-")) if storage.is_s3(root) else Path(root) / "kfp-local"
    kfp_root.mkdir(parents=True, exist_ok=True)
    log_path = kfp_root / "pipeline.log"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(kfp_root), raise_on_error=True)
    started = time.perf_counter()
    log.info(
        "running the MedCritical pipeline locally: %d self-play round(s), outputs in %s", recipe.selfplay.rounds, root
    )
    log.info("full log (every step's output): %s", log_path)
    # The recipe checked in full once, here: the configure task (a fresh Python) takes the result instead of
    # importing torch, transformers and TRL to check it again (kfp_runtime.RESOLVED_RECIPE_ENV).
    try:
        resolved = resolved_recipe_env(recipe_parameter(recipe))
    except RecipeError:
        resolved = {}  # the configure task checks it in full and fails, as without this
    with open(log_path, "a", encoding="utf-8") as log_file:
        echo = ConsoleEcho(log_file, sys.stdout, started)
        try:
            with contextlib.ExitStack() as scope:
                scope.enter_context(task_environment(resolved))
                if warm:  # started in the tasks' environment: a task whose environment differs runs on its own
                    scope.enter_context(task_environment(scope.enter_context(warm_worker.offered(log_file))))
                scope.enter_context(contextlib.redirect_stdout(echo))
                scope.enter_context(warnings.catch_warnings())
                # Expected locally: the steps run in this Python, not in their images; names are for the UI.
                warnings.filterwarnings(
                    "ignore", message=".*(non-Python base image|no effect in the current local runner)"
                )
                pipeline_for(recipe)()
        except Exception as e:
            echo.flush()
            log_file.flush()
            text = log_path.read_text(encoding="utf-8", errors="replace")
            log.error("the pipeline failed; the end of %s:\n%s", log_path, "\n".join(text.splitlines()[-40:]))
            failed = failed_task_error(str(e), text)
            if failed:
                raise failed from e
            raise
    log.info("pipeline finished in %.0f s", time.perf_counter() - started)
    report_uri = join_uri(root, REPORT.folder)
    if storage.is_s3(report_uri):
        return storage.materialize(report_uri, Path(tempfile.mkdtemp(prefix="report-")))
    return Path(report_uri)


@contextlib.contextmanager
def task_environment(variables: dict[str, str]):
    """`variables` in this process's environment while the pipeline runs (its tasks, subprocesses, inherit
    them), as they were afterwards."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# A task's own error, as the step's process printed it last: `medcritical.storage.errors.StorageConfigError: ...`.
_STEP_ERROR = re.compile(r"^\s*(?P<module>medcritical(?:\.\w+)*)\.(?P<name>\w+): (?P<message>.+)$")
_FAILED_TASK = re.compile(r"Inner task failed: '(?P<task>[^']+)'")


class TaskFailed(UserError, RuntimeError):
    """A task of `medcritical run` stopped on an input or setting the user fixes; its message is the task's."""


def failed_task_error(runner_message: str, log_text: str) -> TaskFailed | None:
    """What the user fixes when KFP's local runner says a task failed: the error the task's step raised, when
    it is one of the project's user errors (shown as one sentence, exit 2, like the step run on its own);
    None for anything else (a bug keeps its traceback)."""
    task = _FAILED_TASK.search(ConsoleEcho.ANSI.sub("", runner_message))
    if not task:
        return None
    for line in reversed(ConsoleEcho.ANSI.sub("", log_text).splitlines()):
        found = _STEP_ERROR.match(line)
        if found:
            break
    else:
        return None
    try:
        error_type = getattr(importlib.import_module(found["module"]), found["name"])
    except (ImportError, AttributeError):
        return None
    if not (isinstance(error_type, type) and issubclass(error_type, UserError)):
        return None
    return TaskFailed(f"task '{task['task']}' failed: {found['message']}")


class ConsoleEcho(io.TextIOBase):
    """Everything to the log file; to the console only the lines a person follows a run by."""

    ANSI = re.compile(r"\x1b\[[0-9;]*m")
    TASK = re.compile(
        r"(Executing task '(?P<start>[^']+)'|Task '(?P<done>[^']+)' finished with status (?P<status>\w+)"
        r"|Pipeline '[^']+' finished with status (?P<pipeline>\w+))"
    )
    # Our steps' log lines, as KFP's executor formats them inside the step's process.
    STEP_LINE = re.compile(r"^\s*\[KFP Executor [^\]]* (?P<level>INFO|WARNING|ERROR|CRITICAL)\]: (?P<message>.*)$")
    KFP_CHATTER = ("Looking for component", "Loading KFP component", "Got executor_input", "Wrote executor output")

    def __init__(self, log_file, console, started: float):
        self.log_file, self.console, self.started = log_file, console, started
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log_file.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._echo(self.ANSI.sub("", line))
        return len(text)

    def _echo(self, line: str) -> None:
        clock = f"[{time.perf_counter() - self.started:5.0f} s]"
        if match := self.TASK.search(line):
            if match["start"]:
                print(f"{clock} {match['start']} ...", file=self.console, flush=True)
            elif match["done"]:
                print(f"{clock} {match['done']}: {match['status'].lower()}", file=self.console, flush=True)
            else:
                print(f"{clock} pipeline: {match['pipeline'].lower()}", file=self.console, flush=True)
        elif (match := self.STEP_LINE.match(line)) and not match["message"].startswith(self.KFP_CHATTER):
            prefix = "" if match["level"] == "INFO" else f"{match['level']}: "
            print(f"         {prefix}{match['message']}", file=self.console, flush=True)
