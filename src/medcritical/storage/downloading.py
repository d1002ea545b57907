"""Download: an object or a folder (a prefix with its manifest) from S3, files and byte ranges in parallel.

Every file lands under a temporary name, is checked against its recorded size and sha256, and only
then is renamed into place; a folder without a manifest is an upload that never finished, refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from medcritical.io.hashing import file_sha256
from medcritical.io.manifest import MANIFEST_NAME, FileEntry, ManifestError, decode, read_manifest, save_manifest
from medcritical.storage.client import S3Settings, connect, explain, read_object_or_none, with_retries
from medcritical.storage.errors import (
    ChecksumMismatchError,
    IncompleteUploadError,
    ObjectNotFoundError,
    StorageConfigError,
    StorageError,
)
from medcritical.storage.transfer import (
    DEFAULT_MAX_WORKERS,
    DEFAULT_PART_SIZE,
    MiB,
    Progress,
    human,
    meta_sha256,
    part_size_for,
    run_parallel,
    stat_or_none,
)
from medcritical.storage.uris import S3Uri, is_s3, parse_s3_uri

if TYPE_CHECKING:  # minio itself is imported only where S3 is used (storage.client)
    from minio import Minio

log = logging.getLogger(__name__)

_BLOCK = 1 * MiB


class _ShortRead(ConnectionError):
    """The server closed a download before sending every byte (transient: retried)."""


class _FileDownload:
    """One object to one local file: ranges land in a temporary file that is checked, then renamed."""

    def __init__(
        self, client: Minio, src: S3Uri, dest: Path, size: int, sha256: str | None, part_size: int, progress: Progress
    ):
        self.client, self.src, self.dest, self.size, self.sha256 = client, src, dest, size, sha256
        self.progress = progress
        self.tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        step = part_size_for(size, part_size)
        # One whole-object GET for small files (hashed while streaming); ranges for large ones.
        self.ranges = [(o, min(step, size - o)) for o in range(0, size, step)] if size > step else [(0, 0)]
        self._left = len(self.ranges)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def tasks(self) -> list[Callable[[], None]]:
        return [lambda o=o, n=n: self._fetch(o, n) for o, n in self.ranges]

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                self.dest.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            return self._fd

    def _fetch(self, offset: int, length: int) -> None:
        fd = self._open()
        whole = len(self.ranges) == 1
        digest = hashlib.sha256() if whole else None

        def attempt() -> int:
            nonlocal digest
            if whole:  # a retry starts the file over: no bytes of an earlier attempt survive
                digest = hashlib.sha256()
                os.ftruncate(fd, 0)
            written = 0
            resp = self.client.get_object(self.src.bucket, self.src.key, offset=offset, length=length)
            try:
                for block in resp.stream(_BLOCK):
                    os.pwrite(fd, block, offset + written)
                    written += len(block)
                    if digest is not None:
                        digest.update(block)
                    self.progress.add(len(block))
            except BaseException:
                self.progress.add(-written)
                raise
            finally:
                resp.close()
                resp.release_conn()
            if length and written != length:
                self.progress.add(-written)
                raise _ShortRead(f"got {written} of {length} bytes")
            return written

        written = with_retries(attempt, what=f"download {self.src} [{offset}:+{length or 'all'}]")
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._finish(written if whole else None, digest.hexdigest() if digest else None)

    def _finish(self, whole_size: int | None, whole_sha: str | None) -> None:
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        size = whole_size if whole_size is not None else self.tmp.stat().st_size
        sha = whole_sha or file_sha256(self.tmp)
        if size != self.size or (self.sha256 is not None and sha != self.sha256):
            self.tmp.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"{self.src}: downloaded data does not match what was recorded at upload (size {size} vs "
                f"{self.size}, sha256 {sha} vs {self.sha256}); the object was changed or corrupted after "
                "upload: rerun the step that wrote it"
            )
        os.replace(self.tmp, self.dest)
        self.progress.add(files=1)

    def cleanup(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self.tmp.unlink(missing_ok=True)


def _read_manifest(client: Minio, folder: S3Uri) -> list[FileEntry] | None:
    body = read_object_or_none(client, folder.join(MANIFEST_NAME))
    if body is None:
        return None
    try:
        return decode(body, f"{folder}/{MANIFEST_NAME}")
    except ManifestError as exc:
        raise StorageError(str(exc)) from exc


def _safe_dest(root: Path, rel: str, folder: S3Uri) -> Path:
    dest = (root / rel).resolve()
    if rel.startswith("/") or ".." in rel.split("/") or not dest.is_relative_to(root.resolve()):
        raise StorageError(f"{folder}/{MANIFEST_NAME}: unsafe path {rel!r} in the manifest; refusing it")
    return dest


def download(
    uri: str,
    local_path: str | os.PathLike,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    part_size: int = DEFAULT_PART_SIZE,
) -> Path:
    """Download an ``s3://`` file or folder to `local_path`; returns the local path written.

    A folder (a prefix with a manifest) lands in `local_path` as a folder; a file lands at
    `local_path`, or inside it when that is an existing folder. Every file is verified and renamed
    into place; files already present with the right size and sha256 are kept.
    """
    if not is_s3(uri):
        raise StorageConfigError(f"{uri}: download() needs an s3:// URI; use materialize() for local paths")
    src = parse_s3_uri(uri)
    settings = S3Settings.from_env(str(uri))
    client = connect(settings, str(uri), max_workers)
    try:
        # The manifest GET comes first: GET errors say what is wrong (HEAD errors have no body).
        manifest = _read_manifest(client, src)
        if manifest is not None:
            return _download_folder(client, src, manifest, Path(local_path), max_workers, part_size)
        stat = with_retries(lambda: stat_or_none(client, src.bucket, src.key), what=f"stat {src}") if src.key else None
        if stat is not None and not getattr(stat, "is_dir", False):
            dest = Path(local_path)
            if dest.is_dir():
                dest = dest / src.key.rsplit("/", 1)[-1]
            sha = meta_sha256(stat)
            if sha is None:
                log.warning("%s: no sha256 recorded (not written by medcritical.storage); checking size only", src)
            _download_files(client, [(src, dest, stat.size, sha)], max_workers, part_size)
            log.info("%s -> %s", src, dest)
            return dest
        leftovers = with_retries(
            lambda: next(iter(client.list_objects(src.bucket, prefix=src.prefix, recursive=True)), None),
            what=f"list {src}",
        )
        if leftovers is not None:
            raise IncompleteUploadError(
                f"{uri}: incomplete upload: objects exist under {src}/ but there is no manifest at "
                f"{src}/{MANIFEST_NAME}; the upload that wrote them failed or is still running: rerun "
                "the step that writes it"
            )
        raise ObjectNotFoundError(
            f"{uri}: nothing there (no object, no folder manifest) at {settings.endpoint}; check the URI, "
            "or run the step that writes it first"
        )
    except Exception as exc:
        raise explain(exc, str(uri), settings) from exc


def _download_folder(
    client: Minio, src: S3Uri, manifest: list[FileEntry], root: Path, max_workers: int, part_size: int
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    items = [(src.join(e.path), _safe_dest(root, e.path, src), e.size, e.sha256) for e in manifest]
    recorded = {(root / e.path).resolve(): e for e in _local_manifest(root)}  # keyed like the destinations
    log.info(
        "downloading %d files (%s) from %s/ to %s with %d workers",
        len(items),
        human(sum(i[2] for i in items)),
        src,
        root,
        max_workers,
    )
    _download_files(client, items, max_workers, part_size, recorded)
    # The folder's manifest on disk, with this machine's mtimes: every file was just checked against
    # it, so a fingerprint or upload of this folder takes its checksums without reading it again.
    save_manifest(root, [FileEntry(e.path, e.size, e.sha256, (root / e.path).stat().st_mtime_ns) for e in manifest])
    return root


def _local_manifest(root: Path) -> list[FileEntry]:
    """What an earlier download into `root` recorded: files it still describes are not read again.
    An unreadable one is no reason to stop: the download replaces it."""
    try:
        return read_manifest(root) or []
    except ManifestError:
        return []


def _already_there(dest: Path, size: int, sha256: str | None, recorded: FileEntry | None) -> bool:
    if sha256 is None or not dest.is_file():
        return False
    stat = dest.stat()
    if recorded is not None and recorded.still_describes(stat):
        return recorded.size == size and recorded.sha256 == sha256
    return stat.st_size == size and file_sha256(dest) == sha256


def _download_files(
    client: Minio,
    items: list[tuple[S3Uri, Path, int, str | None]],
    max_workers: int,
    part_size: int,
    recorded: dict[Path, FileEntry] | None = None,
) -> list[Path]:
    recorded = recorded or {}
    present = run_parallel(
        [lambda d=d, n=n, s=s: _already_there(d, n, s, recorded.get(d)) for _, d, n, s in items], max_workers
    )
    todo = [item for item, done in zip(items, present) if not done]
    total = sum(n for _, _, n, _ in todo)
    progress = Progress("downloaded", len(todo), total)
    if len(todo) < len(items):
        log.info("%d of %d files already present and intact, kept", len(items) - len(todo), len(items))
    jobs = [_FileDownload(client, src, dest, size, sha, part_size, progress) for src, dest, size, sha in todo]
    try:
        run_parallel([t for job in jobs for t in job.tasks()], max_workers)
    finally:
        for job in jobs:
            job.cleanup()  # removes temporary files of anything that did not finish
    if todo:
        log.info("%s", progress.line())
    return [dest for _, dest, _, _ in items]
