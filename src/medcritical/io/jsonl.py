"""JSONL files, written and read the same way by every step.

- `append_jsonl`: the append-only logs a step grows as work finishes (rollouts, evaluation outputs,
  teacher replies); flushed and fsynced, so a crash loses at most the line being written.
- `read_jsonl`: a torn *last* line (a crash mid-write) is dropped with a warning, in every step the
  same way, and the rerun redoes that row; a bad line anywhere else is an error naming file and line.
- `write_jsonl`: a whole file at once, atomically (a reader never sees half a file).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from medcritical.errors import UserError

log = logging.getLogger(__name__)


class JsonlError(UserError, ValueError):
    """A JSONL file that cannot be read; the message names the file, the line and the fix."""


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of `path` ([] when it does not exist); a torn last line is dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise JsonlError(f"{path}: not UTF-8 text (byte {e.start}); JSONL files are UTF-8") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not any(rest.strip() for rest in lines[number:]):
                log.warning(
                    "%s: dropping the torn last line %d (an interrupted write); it will be redone", path, number
                )
                break
            raise JsonlError(
                f"{path}: line {number} is not valid JSON ({e.msg}); fix or delete that line, "
                "or delete the file to start that work over"
            ) from None
    return records


def append_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """Append records, one line each, flushed and fsynced.

    Every complete record ends in a newline, so a file that does not is one whose last write was
    torn by a crash: that fragment is cut off first (with a warning), never left in the middle.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    with path.open("ab+") as f:
        _cut_torn_tail(f, path)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _cut_torn_tail(f, path: Path) -> None:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(max(0, size - (1 << 20)))
    tail = f.read()
    if b"\n" not in tail:  # a record longer than the window: look at the whole file
        f.seek(0)
        tail = f.read()
    if tail.endswith(b"\n"):
        return
    fragment = tail[tail.rfind(b"\n") + 1 :]
    try:
        json.loads(fragment)
        f.write(b"\n")  # a complete record that only lacks its newline (an edited file): keep it
    except ValueError:
        log.warning("%s: cutting a torn last line (an interrupted write); it will be redone", path)
        f.truncate(size - len(fragment))
        f.seek(0, os.SEEK_END)


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """Write all records at once, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
