"""Upload: a file or a folder to S3, files and parts in parallel, the folder's manifest written last.

A folder's checksums come from its own ``_MANIFEST.json`` where the files are unchanged since it was
written (a training step writes one beside model/), so a saved model is not hashed again on its way to
S3; the manifest uploaded at the end lists every file that went up.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from medcritical.io.fingerprint import FINGERPRINT_FILE, describe_changes
from medcritical.io.lock import LOCK_FILE
from medcritical.io.manifest import MANIFEST_NAME, FileEntry, checksum, encode, read_manifest
from medcritical.storage.client import S3Settings, connect, explain, read_object_or_none, s3_session, with_retries
from medcritical.storage.errors import ChecksumMismatchError, ObjectNotFoundError, OutputTakenError, StorageConfigError
from medcritical.storage.transfer import (
    DEFAULT_MAX_WORKERS,
    DEFAULT_PART_SIZE,
    SHA256_META,
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

PROBE_PREFIX = ".medcritical-probe-"


# ---------------------------------------------------------------------------------------------
# Before a step's work: probe the output, clean up after an interrupted run


def check_output(uri: str, *, abort_abandoned: bool = True) -> None:
    """Fail before the work: write and remove a small probe object under the output URI, so wrong
    credentials, a missing bucket or no write permission stop a step in seconds, not when it uploads
    hours later; then abort the multipart uploads an interrupted run left under it.

    Call it as the output's one writer (the step holds the output's lease): another writer's upload in
    progress under the same URI would be aborted too. `abort_abandoned=False` only probes (a run root,
    whose steps abort their own).
    """
    with s3_session(uri) as (target, client):
        probe = target.prefix + PROBE_PREFIX + uuid.uuid4().hex[:12]
        with_retries(
            lambda: client.put_object(target.bucket, probe, io.BytesIO(b"probe"), 5),
            what=f"write a probe object under {target}",
        )
        with_retries(lambda: client.remove_object(target.bucket, probe), what=f"remove the probe object under {target}")
        if abort_abandoned:
            abort_abandoned_uploads(client, target)
    log.debug("%s: writable (probe object written and removed)", target)


def abort_abandoned_uploads(client: Minio, target: S3Uri, *, folder: bool = True) -> int:
    """Abort unfinished multipart uploads under `target` (a folder prefix, or exactly that key): a
    killed run leaves their parts on the server, invisible to readers but stored and billed."""
    prefix = target.prefix if folder else target.key
    aborted = 0
    for _ in range(1000):  # each page is aborted, so the next listing starts over with what is left
        page = with_retries(
            lambda: client._list_multipart_uploads(target.bucket, prefix=prefix or None, max_uploads=1000),
            what=f"list unfinished uploads under {target}",
        )
        uploads = [u for u in page.uploads if folder or u.object_name == target.key]
        for upload in uploads:
            with_retries(
                lambda u=upload: client._abort_multipart_upload(target.bucket, u.object_name, u.upload_id),
                what=f"abort the unfinished upload of s3://{target.bucket}/{upload.object_name}",
            )
        aborted += len(uploads)
        if not uploads or not page.is_truncated:
            break
    if aborted:
        log.info("%s: aborted %d unfinished multipart upload(s) left by an interrupted run", target, aborted)
    return aborted


# ---------------------------------------------------------------------------------------------
# One file


class _UnchangedReader:
    """Hands the SDK a file, counting what it reads. When the last byte is read the file must still
    have the size and mtime it had when hashed; otherwise (a step still writing it) fail then, before
    the last part is sent, so the SDK aborts instead of publishing an object its sha256 does not fit."""

    def __init__(self, f: BinaryIO, path: Path, entry: FileEntry, progress: Progress):
        self.f, self.path, self.entry, self.progress = f, path, entry, progress
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        self.progress.add(len(data))
        if self.count >= self.entry.size:
            self.check()
        return data

    def check(self) -> None:
        if self.count != self.entry.size or not self.entry.still_describes(os.fstat(self.f.fileno())):
            raise ChecksumMismatchError(
                f"{self.path}: the file changed while it was being uploaded (its size or modification time "
                "differs from when it was hashed); make sure the step has finished writing it, then publish again"
            )


def _upload_file(
    client: Minio,
    path: Path,
    entry: FileEntry,
    dest: S3Uri,
    *,
    part_size: int,
    parallel_parts: int,
    progress: Progress,
    skip_if_same: bool,
) -> None:
    """Upload one file whose checksum is `entry`, then check the stored object."""
    size, sha = entry.size, entry.sha256
    if skip_if_same:
        existing = with_retries(lambda: stat_or_none(client, dest.bucket, dest.key), what=f"stat {dest}")
        if existing is not None and existing.size == size and meta_sha256(existing) == sha:
            log.debug("%s: already uploaded, skipped", dest)
            progress.add(size, files=1)
            return

    def attempt() -> None:
        with open(path, "rb") as f:
            reader = _UnchangedReader(f, path, entry, progress)
            try:
                client.put_object(
                    dest.bucket,
                    dest.key,
                    reader,
                    size,
                    metadata={SHA256_META: sha},
                    part_size=part_size_for(size, part_size),
                    num_parallel_uploads=parallel_parts,
                )
                reader.check()
            except BaseException:
                progress.add(-reader.count)  # this attempt's bytes do not count
                raise

    with_retries(attempt, what=f"upload {path} -> {dest}")
    stat = with_retries(lambda: client.stat_object(dest.bucket, dest.key), what=f"stat {dest}")
    if stat.size != size or meta_sha256(stat) != sha:
        raise ChecksumMismatchError(
            f"{dest}: after upload the object has size {stat.size} and sha256 {meta_sha256(stat)}, "
            f"expected {size} and {sha}; another writer may be using the same URI: give each run its own"
        )
    progress.add(files=1)


# ---------------------------------------------------------------------------------------------
# A file or a folder


def upload(
    local_path: str | os.PathLike,
    uri: str,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    part_size: int = DEFAULT_PART_SIZE,
    exclude_dirs: Sequence[str] = (),
) -> str:
    """Upload a file or a folder to an ``s3://`` URI; returns the URI written.

    A file goes to the key (or into it, when the URI ends with '/'). A folder goes under the prefix,
    files in parallel, large ones in parallel parts, then the manifest; its top-level subfolders
    named in `exclude_dirs` stay behind. Re-running after a failure skips files already uploaded intact.
    """
    src = Path(local_path)
    if not is_s3(uri):
        raise StorageConfigError(f"{uri}: upload() needs an s3:// URI; use publish() for local paths")
    if not src.exists():
        raise ObjectNotFoundError(f"{src}: no such file or folder to upload; check the path")
    target = parse_s3_uri(uri)
    if src.is_file() and str(uri).endswith("/"):
        target = target.join(src.name)
    settings = S3Settings.from_env(str(target))
    client = connect(settings, str(target), max_workers)
    try:
        abort_abandoned_uploads(client, target, folder=src.is_dir())
        if src.is_dir():
            _upload_folder(client, settings, src, target, max_workers, part_size, exclude_dirs)
            return str(target)
        progress = Progress("uploaded", 1, src.stat().st_size)
        entry = checksum(src.parent, src.name)
        _upload_file(
            client,
            src,
            entry,
            target,
            part_size=part_size,
            parallel_parts=max_workers,
            progress=progress,
            skip_if_same=False,
        )
        log.info("%s -> %s (%s)", src, target, progress.line())
        return str(target)
    except Exception as exc:
        raise explain(exc, str(target), settings) from exc


def _local_files(folder: Path, exclude_dirs: Sequence[str] = ()) -> list[str]:
    """Relative posix paths of the files under `folder` to upload, sorted; top-level `exclude_dirs`,
    the folder's manifest (the upload writes its own) and the writer's lock file left out."""
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if rel.split("/", 1)[0] in exclude_dirs and "/" in rel or rel in (LOCK_FILE, MANIFEST_NAME):
                continue  # the lock file only means something where the writer runs
            files.append(rel)
    return files


def _refuse_other_work(client: Minio, src: Path, target: S3Uri) -> None:
    """One output, one piece of work: when the S3 folder already records a resume fingerprint
    (fingerprint.json: inputs, settings, weights) other than the one of the folder going up, another
    worker wrote a different result there; overwriting it would mix two runs. Refused, naming what differs."""
    local = src / FINGERPRINT_FILE
    if not local.is_file():
        return
    remote = read_object_or_none(client, target.join(FINGERPRINT_FILE))
    if remote is None:
        return
    try:
        before, after = json.loads(remote), json.loads(local.read_text(encoding="utf-8"))
    except ValueError:
        return  # an unreadable record vouches for nothing: the upload replaces it
    if before != after:
        changes = describe_changes(before, after)
        raise OutputTakenError(
            f"{target}/: holds the results of other work ({'; '.join(changes[:6])}), written by another run or "
            "worker; give this run another output URI, or delete that folder if it is stale"
        )


def _upload_folder(
    client: Minio,
    settings: S3Settings,
    src: Path,
    target: S3Uri,
    max_workers: int,
    part_size: int,
    exclude_dirs: Sequence[str],
) -> None:
    files = _local_files(src, exclude_dirs)
    known = {e.path: e for e in read_manifest(src) or []}  # checksums a training step already took
    manifest_key = target.prefix + MANIFEST_NAME
    _refuse_other_work(client, src, target)
    total = sum((src / rel).stat().st_size for rel in files)
    # An old manifest would vouch for files we are about to overwrite: remove it first.
    with_retries(lambda: client.remove_object(target.bucket, manifest_key), what=f"remove old manifest of {target}")
    log.info(
        "uploading %d files (%s) from %s to %s/ with %d workers", len(files), human(total), src, target, max_workers
    )
    progress = Progress("uploaded", len(files), total)
    parallel_parts = max(1, max_workers // max(1, min(len(files), max_workers)))

    def task(rel: str) -> Callable[[], FileEntry]:
        def run() -> FileEntry:
            dest = target.join(rel)
            try:
                entry = checksum(src, rel, known.get(rel))
                _upload_file(
                    client,
                    src / rel,
                    entry,
                    dest,
                    part_size=part_size,
                    parallel_parts=parallel_parts,
                    progress=progress,
                    skip_if_same=True,
                )
            except Exception as exc:
                err = explain(exc, str(dest), settings)
                raise type(err)(
                    f"{err} [folder upload {src} -> {target}/ stopped; no manifest was written, so "
                    "readers see it as incomplete; rerun the step to finish (intact files are skipped)]"
                ) from exc
            return FileEntry(entry.path, entry.size, entry.sha256)  # the mtime is this machine's business

        return run

    body = encode(run_parallel([task(rel) for rel in files], max_workers))
    with_retries(
        lambda: client.put_object(
            target.bucket, manifest_key, io.BytesIO(body), len(body), content_type="application/json"
        ),
        what=f"write manifest of {target}",
    )
    log.info("%s -> %s/ done: %s; manifest %s", src, target, progress.line(), S3Uri(target.bucket, manifest_key))
