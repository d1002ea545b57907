"""One writer per output folder: a second run into a folder in use stops at once, naming the holder.

The lock is a file, ``.medcritical.lock``, holding the holder's host, PID and start time, taken with
an exclusive ``flock`` for as long as the step runs. The kernel releases a flock when its process
dies (kill -9 included), so a lock left behind by a crash is stale by construction and the next run
takes it over; the file's contents only serve the message. (Not `filelock`, which the work folder's lock uses:
the holder's record is written into the locked file and read back by the refused run, and filelock keeps the
open file to itself.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from medcritical.errors import OutputError, UserError, explain_os_error

LOCK_FILE = ".medcritical.lock"


class FolderInUse(UserError, RuntimeError):
    """Another process is writing into the same output folder."""


@contextlib.contextmanager
def output_lock(folder: str | Path, what: str = "step") -> Iterator[None]:
    """Hold the folder's lock while the body runs; raise `FolderInUse` if another process holds it.

    Reentrant within a process (a step that calls another step's library code into the same folder),
    since flock is per open file description and we keep one per folder.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file, not a folder; give an output folder (new, or a step's earlier output)")
    path = folder / LOCK_FILE
    try:  # the first write into the output: a read-only or full disk is named here, before any work
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for as long as the lock is)
    except OSError as e:
        raise (explain_os_error(e) or e) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            raise FolderInUse(
                f"{folder}: another run is writing here ({holder}); wait for it to finish, stop it, "
                "or choose another output folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder_record(what)))
        handle.flush()
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


_held: set[str] = set()


def holder_record(what: str) -> dict:
    """Who writes an output, as a lock file or an S3 lease (storage/lease.py) records it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe_holder(info: dict) -> str:
    """A holder record in words, for the message that refuses a second writer."""
    try:
        return f"{info['what']} by PID {info['pid']} on host {info['host']} since {info['since']}"
    except (KeyError, TypeError):
        return "holder unknown"


def _describe(text: str) -> str:
    try:
        return describe_holder(json.loads(text))
    except ValueError:
        return "holder unknown"
