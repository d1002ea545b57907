"""A folder's manifest, ``_MANIFEST.json``: every file's path, size and sha256, one format for the project.

The manifest is what makes a folder complete, wherever it lives:

- on disk, a training step writes it last beside ``model/``: a finished run (`write_manifest`);
- in S3, `medcritical.storage` writes it under the folder's prefix after every file is uploaded and
  checked, and a reader refuses a prefix without one.

On disk each entry also records the file's ``mtime_ns`` when it was hashed. While a file keeps that
size and mtime its checksum is taken from the manifest, not read again (`checksums`): a trained
model is hashed once, when it is saved, and that hash is the one its upload records and the one its
resume fingerprint (`io.fingerprint.model_fingerprint`) is made of.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medcritical.errors import MissingInputError, UserError
from medcritical.io.hashing import file_sha256

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = "medcritical-folder/1"


class ManifestError(UserError, ValueError):
    """A manifest this version cannot read, or a folder whose files no longer match their manifest."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the folder, '/'-separated
    size: int
    sha256: str
    mtime_ns: int | None = None  # on disk only: the file's mtime when it was hashed

    def to_json(self) -> dict:
        entry = {"path": self.path, "size": self.size, "sha256": self.sha256}
        return entry if self.mtime_ns is None else entry | {"mtime_ns": self.mtime_ns}

    def still_describes(self, stat: os.stat_result) -> bool:
        """The file has not been rewritten since it was hashed (same size and mtime)."""
        return self.mtime_ns is not None and stat.st_size == self.size and stat.st_mtime_ns == self.mtime_ns


def encode(entries: Sequence[FileEntry]) -> bytes:
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "file_count": len(entries),
        "total_bytes": sum(e.size for e in entries),
        "files": [e.to_json() for e in entries],
    }
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def decode(body: bytes | str, where: str) -> list[FileEntry]:
    """The entries of a manifest; `where` names it in the error."""
    try:
        manifest = json.loads(body)
        if manifest["format"] != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest['format']!r}, expected {MANIFEST_FORMAT!r}")
        return [
            FileEntry(str(e["path"]), int(e["size"]), str(e["sha256"]), e.get("mtime_ns")) for e in manifest["files"]
        ]
    except Exception as exc:
        raise ManifestError(
            f"{where}: not a manifest this version understands ({exc!r}); rerun the step that wrote the folder"
        ) from exc


def read_manifest(folder: str | Path) -> list[FileEntry] | None:
    """The entries of ``folder/_MANIFEST.json``; None when the folder has none."""
    path = Path(folder) / MANIFEST_NAME
    return decode(path.read_bytes(), str(path)) if path.is_file() else None


def save_manifest(folder: str | Path, entries: Sequence[FileEntry]) -> Path:
    """Write ``folder/_MANIFEST.json`` whole or not at all (temporary file, then rename)."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    tmp.write_bytes(encode(entries))
    tmp.replace(path)
    return path


def checksum(folder: str | Path, path: str, known: FileEntry | None = None) -> FileEntry:
    """The entry of one file of `folder` (relative path): `known` while the file keeps the size and
    mtime it had when hashed, hashed now otherwise."""
    stat = (Path(folder) / path).stat()  # before hashing: a write during the hash changes the mtime
    if known is not None and known.still_describes(stat):
        return known
    return FileEntry(path, stat.st_size, file_sha256(Path(folder) / path), stat.st_mtime_ns)


def checksums(folder: str | Path, paths: Iterable[str]) -> list[FileEntry]:
    """Entries for these files of `folder`, from the folder's manifest where it still holds."""
    known = {e.path: e for e in read_manifest(folder) or []}
    return [checksum(folder, path, known.get(path)) for path in paths]


def write_manifest(folder: str | Path, paths: Iterable[str | Path]) -> Path:
    """The manifest of every file under `paths` (files or folders inside `folder`), written last: it
    marks the folder complete."""
    folder = Path(folder)
    files = []
    for path in map(Path, paths):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return save_manifest(folder, checksums(folder, [f.relative_to(folder).as_posix() for f in files]))


def verify_manifest(folder: str | Path) -> list[str]:
    """Files of the manifest that are gone or whose content no longer matches (every file read
    again); empty when all is intact."""
    folder = Path(folder)
    entries = read_manifest(folder)
    if entries is None:
        raise MissingInputError(f"{folder}: no {MANIFEST_NAME}; the step that writes this folder did not finish")
    return [
        e.path
        for e in entries
        if not (folder / e.path).is_file()
        or (folder / e.path).stat().st_size != e.size
        or file_sha256(folder / e.path) != e.sha256
    ]


def check_integrity(folder: str | Path, under: str = "") -> None:
    """Refuse a folder whose files no longer match its manifest (a byte overwritten, a file truncated
    or deleted), before anything reads them; nothing to check when the folder has no manifest.

    `under` limits the check to that relative path: a file, or the entries below a folder (``model``). A
    file that keeps the size and mtime it had when hashed is taken as unchanged (no rereading of a
    model's gigabytes on every use); one rewritten since is hashed again and compared."""
    folder = Path(folder)
    try:
        entries = read_manifest(folder)
    except OSError:
        return
    under = under.strip("/")
    for entry in entries or []:
        if under and entry.path != under and not entry.path.startswith(f"{under}/"):
            continue
        path = folder / entry.path
        fix = f"the folder was changed after {folder / MANIFEST_NAME} was written; rerun the step that made it"
        if not path.is_file():
            raise ManifestError(f"{path}: missing, though the folder's manifest lists it; {fix}")
        stat = path.stat()
        if stat.st_size != entry.size:
            raise ManifestError(f"{path}: {stat.st_size} bytes where the manifest records {entry.size}; {fix}")
        if not entry.still_describes(stat) and file_sha256(path) != entry.sha256:
            raise ManifestError(f"{path}: its content no longer matches the manifest's sha256; {fix}")
