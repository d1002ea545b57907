"""Resuming the self-play logs that grow as work finishes, so a rerun continues where a crash left off."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from pathlib import Path

from medcritical.io.jsonl import read_jsonl, write_jsonl

log = logging.getLogger(__name__)


def trajectory_key(record: dict) -> tuple[str, int]:
    """A rollout trajectory's key in the self-play logs: its question and sample number."""
    return record["question_id"], record["sample"]


def resume_groups(path: str | Path, key: Callable[[dict], Hashable], complete: Callable[[list[dict]], bool]) -> dict:
    """Records of `path` grouped by `key`, keeping only complete groups; the file is rewritten to hold
    exactly those, so work that a crash cut short is redone cleanly rather than duplicated."""
    groups: dict = {}
    for record in read_jsonl(path):
        groups.setdefault(key(record), []).append(record)
    finished = {k: v for k, v in groups.items() if complete(v)}
    if len(finished) != len(groups) and Path(path).is_file():
        log.info("%s: redoing %d unfinished group(s)", path, len(groups) - len(finished))
    if Path(path).is_file():
        write_jsonl((r for group in finished.values() for r in group), path)
    return finished
