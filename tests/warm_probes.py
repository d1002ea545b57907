"""Functions the warm worker's tests call through `warm_worker.call` from a task-like process (see
tests/test_warm_worker.py). They live in a module of their own: the worker's fork imports them by name."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from medcritical.errors import InputError

log = logging.getLogger(__name__)


def where(text: str) -> dict:
    """Print and log `text`; say where this ran."""
    print(text)
    log.info("logged: %s", text)
    print(f"stderr: {text}", file=sys.stderr)
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "cwd": os.getcwd(),
        "probe_variable": os.environ.get("PROBE_VARIABLE"),
        "json_loaded_before": "json" in sys.modules,
    }


def refuse(field: str) -> None:
    raise InputError(f"{field} is not a number: fix it in the recipe")


def exit_with(code: str) -> None:
    sys.exit(int(code))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_forever(pid_file: str) -> None:
    with open(pid_file, "w", encoding="ascii") as file:
        file.write(str(os.getpid()))
    while True:
        time.sleep(1)


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def raise_unpicklable() -> None:
    raise Unpicklable("a", "b")
