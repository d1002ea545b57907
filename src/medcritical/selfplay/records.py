"""Resuming the self-play logs that grow as work finishes, so a rerun continues where a crash left off."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Hashable

from medcritical.io.jsonl import read_jsonl, write_jsonl

log = logging.getLogger(__name__)


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


def check_resume_meta(path: str | Path, meta: dict) -> None:
    """Refuse to resume into a folder whose earlier results came from other inputs or settings.

    `meta` names what the results depend on (model, prompt versions, sampling); it is written on the
    first run and compared on every rerun, so stale results are never mixed with new ones.
    """
    path = Path(path)
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in meta.keys() | before.keys() if before.get(k) != meta.get(k))
        if changed:
            details = "; ".join(f"{k}: {before.get(k)!r} -> {meta.get(k)!r}" for k in changed)
            raise ValueError(
                f"{path.parent}: holds results made with other settings ({details}). Use a new output "
                f"folder, or delete {path.parent} to start over."
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
