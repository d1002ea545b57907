"""The fingerprint of a stage that resumes logs of its own (distill, rollout, evaluate), recorded in two steps.

`check_resume` records, when the work starts, the part its logs depend on (the teacher's replies, the
rollouts, the generated answers): a rerun with other values there refuses to mix them. `record_finished` adds,
once every output is written, what only the finished outputs depend on (the questions kept and the acceptance
settings, the pairs settings and prices, a report's label); `forget_finished` takes it away again before the
next run rewrites them. So the recorded fingerprint equals the stage's `expected_fingerprint`
(medcritical.core.stage) exactly while the folder holds a finished run, and a change of those settings alone
runs the stage again, which resumes its logs as they are and rebuilds the outputs from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medcritical.io.fingerprint import FINGERPRINT_FILE, canonical, recorded, write_fingerprint


def forget_finished(output_dir: str | Path, keys: Iterable[str]) -> None:
    """Before a stage works in `output_dir` again: its recorded fingerprint loses the `keys` a finished run added
    (`record_finished`), so the folder does not read as finished while its outputs are rewritten, and the
    stage's resume check compares only what its logs depend on."""
    path, keys = Path(output_dir) / FINGERPRINT_FILE, set(keys)
    if not path.is_file():
        return
    before = recorded(path.read_bytes())
    if isinstance(before, dict) and before.keys() & keys:
        write_fingerprint(path, {k: v for k, v in before.items() if k not in keys})


def record_finished(output_dir: str | Path, finished: dict[str, Any]) -> None:
    """Once a stage has written every output: `finished` (what only those outputs depend on) added to the
    fingerprint its resume check recorded. Written last: from then on the runner reads the folder as finished."""
    path = Path(output_dir) / FINGERPRINT_FILE
    write_fingerprint(path, recorded(path.read_bytes()) | canonical(finished))
