"""Artifacts at ``s3://bucket/key`` URIs or local paths: one package, so every step moves data the same way.

Steps call two functions and never care where data lives:

- ``materialize(uri, workdir) -> Path``: a local path for an input (local paths as they are, S3 URIs
  downloaded under ``workdir``).
- ``publish(local_path, uri)``: put an output where the URI says (no-op for the same local path,
  an atomic copy for another local path, an upload for S3).

``upload`` and ``download`` are the S3 halves. The endpoint and credentials come only from the
environment (``MEDCRITICAL_S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optional
``AWS_SESSION_TOKEN`` and ``AWS_REGION``), never from arguments, and are never logged.

Guarantees (see docs/storage.md):

- A folder upload writes ``<prefix>/_MANIFEST.json`` (the project's folder manifest, io/manifest.py:
  relative path, size and sha256 of every file) after every file is uploaded and checked, and deletes
  any old manifest before it starts. A folder without a manifest is incomplete and ``download`` refuses it.
- One object is never visible half-written: S3 publishes a PUT or a completed multipart upload
  whole, and a failed multipart upload is aborted.
- Every downloaded file is written under a temporary name, checked (size and sha256) and only then
  renamed into place; a downloaded folder gets the manifest too, with local mtimes, so its files
  are not hashed again while unchanged.
- Transient failures (connection errors, timeouts, HTTP 5xx, SlowDown) are retried with backoff, by
  one function (``client.with_retries``); 403/404 and checksum mismatches are not.
- Re-running an interrupted transfer resumes: files whose size and sha256 already match are skipped.
- A step checks its output before any work (``check_output``: a probe object written and removed),
  and the multipart uploads a killed run left under it are aborted then, and again by ``upload``.

Modules: ``uris`` (S3 URIs), ``errors``, ``client`` (environment, client, the retry policy, errors
explained), ``transfer`` (parallel runner, progress, part sizes), ``uploading``, ``downloading``.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from medcritical.io.hashing import file_sha256 as sha256_file
from medcritical.io.manifest import MANIFEST_NAME
from medcritical.storage.client import (
    ACCESS_KEY_ENV,
    ENDPOINT_ENV,
    REGION_ENV,
    SECRET_KEY_ENV,
    SESSION_TOKEN_ENV,
    RetryPolicy,
    S3Settings,
    is_transient,
    with_retries,
)
from medcritical.storage.downloading import download
from medcritical.storage.errors import (
    BucketNotFoundError,
    ChecksumMismatchError,
    IncompleteUploadError,
    ObjectNotFoundError,
    OutputTakenError,
    StorageAuthError,
    StorageConfigError,
    StorageError,
)
from medcritical.storage.transfer import DEFAULT_MAX_WORKERS, DEFAULT_PART_SIZE
from medcritical.storage.uploading import abort_abandoned_uploads, check_output, upload
from medcritical.storage.uris import S3Uri, is_s3, parse_s3_uri

log = logging.getLogger(__name__)


def materialize(uri: str | os.PathLike, workdir: str | os.PathLike, *, max_workers: int = DEFAULT_MAX_WORKERS) -> Path:
    """A local path holding the data at `uri`: a local path is returned as it is (it must exist);
    an S3 URI is downloaded to ``workdir/<bucket>/<key>``."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise ObjectNotFoundError(
                f"{path}: no such file or folder; check the path, or run the step that writes it first"
            )
        return path
    src = parse_s3_uri(str(uri))
    dest = Path(workdir) / src.bucket / src.key if src.key else Path(workdir) / src.bucket
    return download(str(uri), dest, max_workers=max_workers)


def publish(local_path: str | os.PathLike, uri: str | os.PathLike, *, max_workers: int = DEFAULT_MAX_WORKERS) -> str:
    """Put the file or folder at `local_path` where `uri` says; returns `uri` as a string.

    S3 URI: upload (folder with manifest). Same local path: nothing to do. Another local path: copy
    to a temporary sibling, then rename into place, so a crash never leaves a half copy at `uri`.
    """
    src = Path(local_path)
    if not src.exists():
        raise ObjectNotFoundError(f"{src}: no such file or folder to publish; check the path")
    if is_s3(uri):
        return upload(src, str(uri), max_workers=max_workers)
    dest = Path(uri)
    if dest.resolve() == src.resolve():
        return str(uri)
    if src.is_dir() and (dest.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(dest.resolve())):
        raise StorageConfigError(f"{uri}: cannot publish folder {src} into itself or its parent; pick another path")
    if dest.exists() and dest.is_dir() != src.is_dir():
        kind = "a folder" if dest.is_dir() else "a file"
        raise StorageConfigError(f"{uri}: already exists as {kind}, and {src} is not; remove it or pick another path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    log.info("%s -> %s (local copy)", src, dest)
    return str(uri)


__all__ = [
    "ACCESS_KEY_ENV",
    "BucketNotFoundError",
    "ChecksumMismatchError",
    "DEFAULT_MAX_WORKERS",
    "DEFAULT_PART_SIZE",
    "ENDPOINT_ENV",
    "IncompleteUploadError",
    "MANIFEST_NAME",
    "ObjectNotFoundError",
    "OutputTakenError",
    "REGION_ENV",
    "RetryPolicy",
    "S3Settings",
    "S3Uri",
    "SECRET_KEY_ENV",
    "SESSION_TOKEN_ENV",
    "StorageAuthError",
    "StorageConfigError",
    "StorageError",
    "abort_abandoned_uploads",
    "check_output",
    "download",
    "is_s3",
    "is_transient",
    "materialize",
    "parse_s3_uri",
    "publish",
    "sha256_file",
    "upload",
    "with_retries",
]
