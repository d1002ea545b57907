"""JSONL files, written and read the same way by every step.

- `append_jsonl`: the append-only logs a step grows as work finishes (rollouts, evaluation outputs,
  teacher replies); flushed and fsynced, so a crash loses at most the line being written.
- `read_jsonl`: a torn *last* line (a crash mid-write) is dropped with a warning, in every step the
  same way, and the rerun redoes that row; a bad line anywhere else is an error naming file and line.
- `write_jsonl`: a whole file at once, atomically (a reader never sees half a file); on a failure
  (a full disk) the temporary file is removed, never left beside the output.
- `read_input_jsonl`: a file the user gives (predictions, pairs): it must exist and be a file.

Every line is one JSON object; anything else (a bare number, a list, a string) is an error naming
the file and its 1-based line. Every record written has each configured secret masked (io.secrets).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from medcritical.errors import MissingInputError, UserError
from medcritical.io.secrets import mask_secrets

log = logging.getLogger(__name__)


class JsonlError(UserError, ValueError):
    """A JSONL file that cannot be read; the message names the file, the line and the fix."""


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of `path` ([] when it does not exist); a torn last line is dropped with a warning."""
    return [record for _, record in numbered_records(path)]


def numbered_records(path: str | Path, *, torn_tail: bool = True) -> list[tuple[int, dict]]:
    """(1-based line number, record) of every record of `path`, by the rules of `read_jsonl`;
    `torn_tail=False` for a file the user wrote: a bad last line is an error there too."""
    path = Path(path)
    if path.is_dir():
        raise JsonlError(f"{path}: is a folder, not a JSONL file; give the file itself")
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise JsonlError(
            f"{path}: not UTF-8 text (line {line}, byte {e.start}); "
            "JSONL files are UTF-8: convert it (e.g. iconv -f GBK -t UTF-8)"
        ) from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail and not any(rest.strip() for rest in lines[number:]):
                log.warning(
                    "%s: dropping the torn last line %d (an interrupted write); it will be redone", path, number
                )
                break
            raise JsonlError(
                f"{path}: line {number} is not valid JSON ({e.msg}); fix or delete that line, "
                "or delete the file to start that work over"
            ) from None
        if not isinstance(record, dict):
            raise JsonlError(
                f"{path}: line {number} is a JSON {_json_type(record)} ({_snippet(line)}), not an object; "
                'each line must be one object such as {"id": ..., ...}: fix or delete that line'
            )
        records.append((number, record))
    return records


def read_input_jsonl(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL file the user names (`what` says which, e.g. "--predictions"):
    it must exist and be a file; the same rules as `read_jsonl` for its lines."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{what} {path}: no such file; check the path")
    if not path.is_file():
        raise JsonlError(f"{what} {path}: is a folder, not a JSONL file; give the file itself")
    return numbered_records(path, torn_tail=False)


def _json_type(value) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _snippet(line: str, limit: int = 40) -> str:
    line = line.strip()
    return line if len(line) <= limit else line[:limit] + "..."


def _line(record: dict) -> str:
    return mask_secrets(json.dumps(record, ensure_ascii=False)) + "\n"


def append_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """Append records, one line each, flushed and fsynced.

    Every complete record ends in a newline, so a file that does not is one whose last write was
    torn by a crash: that fragment is cut off first (with a warning), never left in the middle.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(map(_line, records)).encode("utf-8")
    with path.open("ab+", buffering=0) as f:  # unbuffered: a failed write is known here, not at close
        _cut_torn_tail(f, path)
        start = f.seek(0, os.SEEK_END)
        try:
            view = memoryview(payload)
            while view:
                view = view[f.write(view) :]
            os.fsync(f.fileno())
        except OSError as e:  # a full disk: leave no torn line behind, and name the file
            os.ftruncate(f.fileno(), start)
            raise OSError(e.errno, e.strerror, str(path)) from e


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
    """Write all records at once, atomically; nothing is left behind when the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a full disk: name the file being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
