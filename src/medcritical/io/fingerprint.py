"""Resume fingerprints: a rerun continues only the work of the same inputs.

A step that resumes (evaluation, rollout, distillation, training) records a *fingerprint* of what
its results depend on — the questions file's content, the prompt files, the protocol settings and
the model's weights — beside its outputs on the first run. A rerun into the same folder must
match it, or `check_resume` stops with an error naming what changed; `restart=True` (the CLI's
``--restart``) clears the step's outputs instead, so a retrained model in the same folder is never
graded from the old model's answers.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medcritical.errors import MissingInputError, UserError
from medcritical.io.hashing import json_sha256, text_sha256
from medcritical.io.manifest import MANIFEST_NAME, checksums

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")


class ResumeMismatch(UserError, ValueError):
    """An output folder holds results made from other inputs or settings."""


def model_fingerprint(model_dir: str | Path) -> str:
    """The weights' identity: the sha256 of the model folder's files (config, tokenizer, weights),
    independent of the folder's path, so the same model downloaded elsewhere matches. The checksums
    come from the manifest the training step wrote beside model/ (or the model folder's own) while
    the files are unchanged, so a saved model is not read again."""
    model_dir = Path(model_dir)
    files = sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) and p.name != MANIFEST_NAME
    )
    if not files:
        raise MissingInputError(f"{model_dir}: no model files to fingerprint (is this a Hugging Face model folder?)")
    run_dir = model_dir.parent
    if (run_dir / MANIFEST_NAME).is_file() and not (model_dir / MANIFEST_NAME).is_file():
        entries = checksums(run_dir, [f"{model_dir.name}/{f}" for f in files])
    else:
        entries = checksums(model_dir, files)
    listing = "\n".join(f"{e.sha256}  {f}" for e, f in zip(entries, files, strict=True))
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        # A LoRA adapter is half a model: the same adapter over another base is another model.
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base and Path(base).is_dir() and Path(base).resolve() != model_dir.resolve():
            base = model_fingerprint(base)
        listing += f"\nbase model: {base}"
    return text_sha256(listing)


def questions_fingerprint(questions: Iterable) -> str:
    """The content of a list of questions (id, text, options, answer), whatever file they came from."""
    return json_sha256([[q.id, q.question, q.options, q.answer] for q in questions])


def check_resume(
    output_dir: str | Path,
    fingerprint: dict[str, Any],
    *,
    outputs: Iterable[str] = (),
    restart: bool = False,
    name: str = FINGERPRINT_FILE,
    write: bool = True,
) -> bool:
    """Compare `fingerprint` with the one recorded in `output_dir`; record it when there is none.

    `outputs` are the files/folders the fingerprint vouches for. On a mismatch: with `restart` they
    are deleted and the new fingerprint recorded; otherwise `ResumeMismatch` names what changed and
    the fix (every stage command has `--restart`, which sets `restart`). `write=False` on the other ranks of a distributed run: they
    check, but recording and deleting is the main process's (see io.ranks.is_main_process).
    Returns True when earlier results are resumed.
    """
    output_dir = Path(output_dir)
    path = output_dir / name
    current = canonical(fingerprint)
    existing = [output_dir / o for o in outputs if (output_dir / o).exists()]
    fix = "rerun with --restart to discard them and start over, or use another output folder"
    if path.is_file():
        before = recorded(path.read_bytes())
        if before == current:
            return bool(existing)
        if not restart and existing:
            changes = describe_changes(before, current)
            details = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise ResumeMismatch(
                f"{output_dir}: holds results made from other inputs or settings ({details}). {fix[0].upper()}{fix[1:]}."
            )
    elif existing and not restart:
        raise ResumeMismatch(
            f"{output_dir}: holds results ({', '.join(p.name for p in existing)}) with no record of what made them; "
            f"{fix}"
        )
    if not write:
        return False  # the main process discards and records; a mismatch here means nothing is resumed
    if restart and existing:
        log.warning("%s: --restart: discarding %s", output_dir, ", ".join(p.name for p in existing))
    for stale in existing:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    write_fingerprint(path, current)
    return False


def write_fingerprint(path: Path, fingerprint: dict[str, Any]) -> None:
    """Record `fingerprint` at `path` whole or not at all (written beside it, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def canonical(fingerprint: dict[str, Any]) -> Any:
    """A fingerprint as it reads back from its JSON file (keys sorted, paths and the like as strings)."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def recorded(body: bytes | str) -> Any:
    """The fingerprint recorded in a fingerprint file's content; a damaged one matches nothing."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {"(unreadable fingerprint.json)": True}  # damaged: nothing vouches for the outputs


def matches(body: bytes | str | None, fingerprint: dict[str, Any]) -> bool:
    """Whether a fingerprint file's content (None: no file) records `fingerprint`: the comparison
    `check_resume` makes, for a reader that has the file's content but no folder (the runner, an S3 output)."""
    return body is not None and recorded(body) == canonical(fingerprint)


def describe_changes(before: Any, after: Any, key: str = "") -> list[str]:
    """What differs between two fingerprints, one "dotted.key: old -> new" per changed leaf
    (``settings.learning_rate: 0.003 -> 0.001``), not two whole blobs."""
    if isinstance(before, dict) and isinstance(after, dict):
        changes = []
        for k in sorted(before.keys() | after.keys(), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in after:
                changes.append(f"{sub}: {_short(before[k])} -> (gone)")
            elif k not in before:
                changes.append(f"{sub}: (none) -> {_short(after[k])}")
            elif before[k] != after[k]:
                changes += describe_changes(before[k], after[k], sub)
        return changes
    return [f"{key or '(whole)'}: {_short(before)} -> {_short(after)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "…" + text[-8:]
