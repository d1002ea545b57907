"""Artifacts at ``s3://bucket/key`` URIs or local paths: one module, so every step moves data the same way.

Steps call two functions and never care where data lives:

- ``materialize(uri, workdir) -> Path``: a local path for an input (local paths as they are, S3 URIs
  downloaded under ``workdir``).
- ``publish(local_path, uri)``: put an output where the URI says (no-op for the same local path,
  an atomic copy for another local path, an upload for S3).

``upload`` and ``download`` are the S3 halves. The endpoint and credentials come only from the
environment (``MEDCRITICAL_S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optional
``AWS_SESSION_TOKEN`` and ``AWS_REGION``), never from arguments, and are never logged.

Guarantees (see docs/storage.md):

- A folder upload writes ``<prefix>/_MANIFEST.json`` (relative path, size and sha256 of every file)
  after every file is uploaded and checked, and deletes any old manifest before it starts. A folder
  without a manifest is incomplete and ``download`` refuses it.
- One object is never visible half-written: S3 publishes a PUT or a completed multipart upload
  whole, and a failed multipart upload is aborted.
- Every downloaded file is written under a temporary name, checked (size and sha256) and only then
  renamed into place.
- Transient failures (connection errors, timeouts, HTTP 5xx, SlowDown) are retried with backoff;
  403/404 and checksum mismatches are not.
- Re-running an interrupted transfer resumes: files whose size and sha256 already match are skipped.
- A step checks its output before any work (``check_output``: a probe object written and removed),
  and the multipart uploads a killed run left under it are aborted then, and again by ``upload``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from medcritical.errors import UserError
from medcritical.io.fingerprint import file_sha256 as sha256_file  # one sha256 for the project
from medcritical.io.lock import LOCK_FILE

log = logging.getLogger(__name__)

ENDPOINT_ENV = "MEDCRITICAL_S3_ENDPOINT"
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"
REGION_ENV = "AWS_REGION"

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = "medcritical-folder/1"
SHA256_META = "sha256"  # stored as x-amz-meta-sha256 on every object this module writes

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 32 * MiB  # multipart part and download range size; memory ~ 2 x workers x this
DEFAULT_MAX_WORKERS = 8
_MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
_MAX_PARTS = 10_000
_BLOCK = 1 * MiB

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Errors: each message names the input, the problem and the fix.


class StorageError(UserError):
    """An artifact could not be read or written; the message says what to check (the CLI exits 2)."""


class StorageConfigError(StorageError):
    """The environment or a URI is unusable (missing variable, malformed endpoint or URI)."""


class StorageAuthError(StorageError):
    """The server refused the credentials, or they lack permission."""


class BucketNotFoundError(StorageError):
    """The bucket named in the URI does not exist."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """Nothing at the URI or local path."""


class IncompleteUploadError(StorageError):
    """A folder prefix holds objects but no manifest: its upload never finished."""


class ChecksumMismatchError(StorageError):
    """Transferred data does not match its recorded size or sha256."""


# ---------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # "" for the bucket root; folders have no trailing slash here

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, relative: str) -> S3Uri:
        return S3Uri(self.bucket, f"{self.key}/{relative}" if self.key else relative)

    @property
    def prefix(self) -> str:
        """The key prefix of this URI taken as a folder ("" or ending in '/')."""
        return f"{self.key}/" if self.key else ""


def parse_s3_uri(uri: str) -> S3Uri:
    """``s3://bucket/some/key`` -> S3Uri("bucket", "some/key"); a trailing '/' is dropped."""
    if not is_s3(uri):
        raise StorageConfigError(f"{uri}: not an S3 URI; expected s3://bucket/key")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageConfigError(
            f"{uri}: '{bucket}' is not a valid bucket name (3-63 characters: lowercase letters, "
            "digits, '.', '-'); fix the bucket part of the URI"
        )
    key = key.strip("/")
    if any(part in ("", ".", "..") for part in key.split("/")) and key:
        raise StorageConfigError(f"{uri}: the key has an empty, '.' or '..' segment; write it plainly")
    return S3Uri(bucket, key)


# ---------------------------------------------------------------------------------------------
# Environment and client


@dataclass(frozen=True)
class S3Settings:
    """Where the S3 server is. Credentials are read straight into the client and kept nowhere else."""

    endpoint: str  # the URL as given, e.g. http://minio:9000 (safe to log)
    host: str  # host[:port]
    secure: bool
    region: str | None

    @classmethod
    def from_env(cls, uri: str = "") -> S3Settings:
        where = f"{uri}: " if uri else ""
        raw = os.environ.get(ENDPOINT_ENV, "").strip()
        if not raw:
            raise StorageConfigError(
                f"{where}{ENDPOINT_ENV} is not set; set it to the S3 endpoint URL, e.g. "
                "http://minio:9000 (MinIO in the cluster) or https://s3.amazonaws.com"
            )
        parts = urlsplit(raw)
        if parts.username or parts.password:
            # Do not echo the value: it holds a secret.
            raise StorageConfigError(
                f"{where}{ENDPOINT_ENV} contains credentials; set it to scheme://host:port only and "
                f"put the keys in {ACCESS_KEY_ENV} and {SECRET_KEY_ENV}"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageConfigError(
                f"{where}{ENDPOINT_ENV}={raw!r} is not an http(s) URL; write e.g. http://minio:9000 "
                "(the scheme decides TLS)"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise StorageConfigError(
                f"{where}{ENDPOINT_ENV}={raw!r} has a path or query; give only scheme://host[:port] "
                "(the bucket belongs in the s3:// URI)"
            )
        region = os.environ.get(REGION_ENV, "").strip() or None
        return cls(endpoint=raw.rstrip("/"), host=parts.netloc, secure=parts.scheme == "https", region=region)


def _client(settings: S3Settings, uri: str, max_workers: int) -> Minio:
    access_key = os.environ.get(ACCESS_KEY_ENV, "")
    secret_key = os.environ.get(SECRET_KEY_ENV, "")
    if not access_key or not secret_key:
        missing = [n for n, v in ((ACCESS_KEY_ENV, access_key), (SECRET_KEY_ENV, secret_key)) if not v]
        raise StorageConfigError(
            f"{uri}: {' and '.join(missing)} not set; set {ACCESS_KEY_ENV} and {SECRET_KEY_ENV} to the "
            f"credentials for {settings.endpoint} (in Kubernetes, from the secret the step's manifest "
            "references)"
        )
    # Our own pool: bounded timeouts (the SDK default is 5 minutes to connect) and a few cheap
    # per-request retries; the retries around whole files and ranges are `with_retries`.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=15, read=120),
        maxsize=max(10, 2 * max_workers),
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504], raise_on_status=False
        ),
    )
    return Minio(
        settings.host,
        access_key=access_key,
        secret_key=secret_key,
        session_token=os.environ.get(SESSION_TOKEN_ENV) or None,
        secure=settings.secure,
        region=settings.region,
        http_client=http,
    )


# ---------------------------------------------------------------------------------------------
# Retries


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5  # seconds; doubles each attempt, with jitter
    max_delay: float = 20.0
    sleep: Callable[[float], None] = time.sleep


RETRY = RetryPolicy()  # module default; tests swap it for one that does not sleep

_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"}


class _ShortRead(ConnectionError):
    """The server closed a download before sending every byte."""


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network trouble or a server-side 5xx. Never 403/404 or local file errors."""
    if isinstance(exc, S3Error):
        status = exc.response.status if exc.response is not None else 0
        return exc.code in _TRANSIENT_CODES or status >= 500
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):
        return bool(re.search(r"Response code: 5\d\d", str(exc)))  # e.g. an HTML 502 from a proxy
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def with_retries(fn: Callable[[], T], *, what: str, policy: RetryPolicy | None = None) -> T:
    """Call ``fn``; on a transient error wait (exponential backoff, jittered) and call it again."""
    policy = policy or RETRY
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == policy.attempts or not is_transient(exc):
                raise
            delay = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning(
                "%s: %s: %s; retry %d of %d in %.1f s",
                what,
                type(exc).__name__,
                exc,
                attempt,
                policy.attempts - 1,
                delay,
            )
            policy.sleep(delay)
    raise AssertionError("unreachable")


def _explain(exc: BaseException, uri: str, settings: S3Settings) -> StorageError:
    """Turn an SDK or network error into a StorageError that says what to do."""
    if isinstance(exc, StorageError):
        return exc
    endpoint = settings.endpoint
    if isinstance(exc, S3Error):
        code = exc.code
        bucket = exc.bucket_name or (parse_s3_uri(uri).bucket if is_s3(uri) else "?")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidSecurity"):
            return StorageAuthError(
                f"{uri}: the S3 server at {endpoint} rejected the credentials ({code}); check "
                f"{ACCESS_KEY_ENV} and {SECRET_KEY_ENV} (and {SESSION_TOKEN_ENV} for temporary "
                "credentials): in Kubernetes, the secret they come from"
            )
        if code == "AccessDenied":
            return StorageAuthError(
                f"{uri}: access denied by {endpoint}: either {ACCESS_KEY_ENV}/{SECRET_KEY_ENV} are "
                f"wrong or these credentials lack read/write permission on bucket '{bucket}'; check the "
                "variables, or grant the permission"
            )
        if code == "NoSuchBucket":
            return BucketNotFoundError(
                f"{uri}: bucket '{bucket}' does not exist at {endpoint}; create it first (e.g. "
                f"`mc mb <alias>/{bucket}` or `aws s3 mb s3://{bucket} --endpoint-url {endpoint}`) or "
                "fix the bucket name in the URI"
            )
        if code == "NoSuchKey":
            return ObjectNotFoundError(
                f"{uri}: no such object at {endpoint}; check the URI, or run the step that writes it first"
            )
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return StorageConfigError(
                f"{uri}: bucket '{bucket}' is in another region ({exc.message}); set {REGION_ENV} to the "
                "bucket's region"
            )
        return StorageError(f"{uri}: S3 error {code} from {endpoint}: {exc.message}")
    if is_transient(exc):
        return StorageError(
            f"{uri}: cannot reach the S3 endpoint {endpoint} ({type(exc).__name__}: {exc}), even after "
            f"retries; check {ENDPOINT_ENV} (scheme, host, port) and that the server is up and "
            "reachable from here"
        )
    if isinstance(exc, (ServerError, InvalidResponseError)):
        return StorageError(f"{uri}: unexpected answer from {endpoint}: {exc}; is {ENDPOINT_ENV} an S3 server?")
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# Helpers: hashing, progress, parallel map


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _Progress:
    """Thread-safe counters, logged for people at most every `interval` seconds."""

    def __init__(self, verb: str, files: int, total_bytes: int, interval: float = 2.0):
        self.verb, self.files, self.total_bytes, self.interval = verb, files, total_bytes, interval
        self.done_files = 0
        self.done_bytes = 0
        self.started = time.monotonic()
        self._last_log = self.started
        self._lock = threading.Lock()

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        with self._lock:
            self.done_bytes += nbytes
            self.done_files += files
            now = time.monotonic()
            if now - self._last_log >= self.interval and self.done_files < self.files:
                self._last_log = now
                log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (
            f"{self.verb} {self.done_files}/{self.files} files, {_human(self.done_bytes)} of "
            f"{_human(self.total_bytes)}, {_human(self.done_bytes / elapsed)}/s"
        )


def _run_parallel(tasks: Sequence[Callable[[], T]], max_workers: int) -> list[T]:
    """Run tasks on a thread pool; on the first failure cancel what has not started and raise it
    once the running ones have stopped (so nothing writes after we return)."""
    if not tasks:
        return []
    with ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="storage") as pool:
        futures = [pool.submit(task) for task in tasks]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            raise failed[0].exception()  # type: ignore[misc]
    return [f.result() for f in futures]


def _part_size_for(size: int, part_size: int) -> int:
    """At least S3's 5 MiB, and large enough that `size` fits in 10,000 parts."""
    needed = math.ceil(size / _MAX_PARTS / MiB) * MiB
    return max(part_size, needed, _MIN_PART_SIZE)


def _stat_or_none(client: Minio, bucket: str, key: str) -> Any | None:
    try:
        return client.stat_object(bucket, key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
            return None
        raise


def _meta_sha256(stat: Any) -> str | None:
    return (stat.metadata or {}).get(f"x-amz-meta-{SHA256_META}")


def _local_files(folder: Path, exclude_dirs: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every file under `folder`, sorted; top-level `exclude_dirs` left out."""
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if rel.split("/", 1)[0] in exclude_dirs and "/" in rel or rel == LOCK_FILE:
                continue  # excluded subfolders; the writer's lock file only means something where it runs
            if rel == MANIFEST_NAME:
                raise StorageConfigError(
                    f"{path}: '{MANIFEST_NAME}' is reserved for the folder manifest; rename the file"
                )
            files.append((rel, path))
    return files


# ---------------------------------------------------------------------------------------------
# Before a step's work: probe the output, clean up after an interrupted run

PROBE_PREFIX = ".medcritical-probe-"


def check_output(uri: str) -> None:
    """Fail before the work: write and remove a small probe object under the output URI, so wrong
    credentials, a missing bucket or no write permission stop a step in seconds, not when it uploads
    hours later; then abort the multipart uploads an interrupted run left under it.

    Call it as the output's one writer (the step holds the folder's lock): another writer's upload in
    progress under the same URI would be aborted too.
    """
    target = parse_s3_uri(uri)
    settings = S3Settings.from_env(uri)
    client = _client(settings, uri, 1)
    probe = target.prefix + PROBE_PREFIX + uuid.uuid4().hex[:12]
    try:
        with_retries(
            lambda: client.put_object(target.bucket, probe, io.BytesIO(b"probe"), 5),
            what=f"write a probe object under {target}",
        )
        with_retries(lambda: client.remove_object(target.bucket, probe), what=f"remove the probe object under {target}")
        abort_abandoned_uploads(client, target)
    except Exception as exc:
        raise _explain(exc, uri, settings) from exc
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
# Upload


class _VerifyingReader:
    """Hands the SDK a file while hashing what it reads. If the bytes read differ from the hash
    taken before the upload (the file changed meanwhile), fail before the last part is sent, so the
    SDK aborts instead of publishing the object."""

    def __init__(self, f, path: Path, size: int, sha256: str, progress: _Progress):
        self.f, self.path, self.size, self.sha256, self.progress = f, path, size, sha256, progress
        self.count = 0
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.count += len(data)
        self.progress.add(len(data))
        if self.count >= self.size:
            self.check()
        return data

    def check(self) -> None:
        if self.count != self.size or self.digest.hexdigest() != self.sha256:
            raise ChecksumMismatchError(
                f"{self.path}: the file changed while it was being uploaded (size or sha256 differs "
                "from a moment before); make sure the step has finished writing it, then publish again"
            )


def _upload_file(
    client: Minio,
    path: Path,
    dest: S3Uri,
    *,
    part_size: int,
    parallel_parts: int,
    progress: _Progress,
    skip_if_same: bool,
) -> dict:
    """Upload one file, check the stored object, return its manifest entry."""
    size = path.stat().st_size
    sha = sha256_file(path)
    entry = {"size": size, "sha256": sha}
    if skip_if_same:
        existing = with_retries(lambda: _stat_or_none(client, dest.bucket, dest.key), what=f"stat {dest}")
        if existing is not None and existing.size == size and _meta_sha256(existing) == sha:
            log.debug("%s: already uploaded, skipped", dest)
            progress.add(size, files=1)
            return entry

    def attempt() -> None:
        with open(path, "rb") as f:
            reader = _VerifyingReader(f, path, size, sha, progress)
            try:
                client.put_object(
                    dest.bucket,
                    dest.key,
                    reader,
                    size,
                    metadata={SHA256_META: sha},
                    part_size=_part_size_for(size, part_size),
                    num_parallel_uploads=parallel_parts,
                )
                reader.check()
            except BaseException:
                progress.add(-reader.count)  # this attempt's bytes do not count
                raise

    with_retries(attempt, what=f"upload {path} -> {dest}")
    stat = with_retries(lambda: client.stat_object(dest.bucket, dest.key), what=f"stat {dest}")
    if stat.size != size or _meta_sha256(stat) != sha:
        raise ChecksumMismatchError(
            f"{dest}: after upload the object has size {stat.size} and sha256 {_meta_sha256(stat)}, "
            f"expected {size} and {sha}; another writer may be using the same URI: give each run its own"
        )
    progress.add(files=1)
    return entry


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
    client = _client(settings, str(target), max_workers)
    try:
        abort_abandoned_uploads(client, target, folder=src.is_dir())
        if src.is_file():
            progress = _Progress("uploaded", 1, src.stat().st_size)
            _upload_file(
                client,
                src,
                target,
                part_size=part_size,
                parallel_parts=max_workers,
                progress=progress,
                skip_if_same=False,
            )
            log.info("%s -> %s (%s)", src, target, progress.line())
            return str(target)
        return _upload_folder(
            client, src, target, settings, max_workers=max_workers, part_size=part_size, exclude_dirs=exclude_dirs
        )
    except Exception as exc:
        raise _explain(exc, str(target), settings) from exc


def _upload_folder(
    client: Minio,
    src: Path,
    target: S3Uri,
    settings: S3Settings,
    *,
    max_workers: int,
    part_size: int,
    exclude_dirs: Sequence[str] = (),
) -> str:
    files = _local_files(src, exclude_dirs)
    manifest_key = target.prefix + MANIFEST_NAME
    total = sum(p.stat().st_size for _, p in files)
    # An old manifest would vouch for files we are about to overwrite: remove it first.
    with_retries(lambda: client.remove_object(target.bucket, manifest_key), what=f"remove old manifest of {target}")
    log.info(
        "uploading %d files (%s) from %s to %s/ with %d workers", len(files), _human(total), src, target, max_workers
    )
    progress = _Progress("uploaded", len(files), total)
    parallel_parts = max(1, max_workers // max(1, min(len(files), max_workers)))

    def task(rel: str, path: Path) -> Callable[[], dict]:
        def run() -> dict:
            dest = target.join(rel)
            try:
                entry = _upload_file(
                    client,
                    path,
                    dest,
                    part_size=part_size,
                    parallel_parts=parallel_parts,
                    progress=progress,
                    skip_if_same=True,
                )
            except Exception as exc:
                err = _explain(exc, str(dest), settings)
                raise type(err)(
                    f"{err} [folder upload {src} -> {target}/ stopped; no manifest was written, so "
                    "readers see it as incomplete; rerun the step to finish (intact files are skipped)]"
                ) from exc
            return {"path": rel, **entry}

        return run

    entries = _run_parallel([task(rel, path) for rel, path in files], max_workers)
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "file_count": len(entries),
        "total_bytes": total,
        "files": entries,
    }
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with_retries(
        lambda: client.put_object(
            target.bucket, manifest_key, io.BytesIO(body), len(body), content_type="application/json"
        ),
        what=f"write manifest of {target}",
    )
    log.info("%s -> %s/ done: %s; manifest %s", src, target, progress.line(), S3Uri(target.bucket, manifest_key))
    return str(target)


# ---------------------------------------------------------------------------------------------
# Download


class _FileDownload:
    """One object to one local file: ranges land in a temporary file that is checked, then renamed."""

    def __init__(
        self, client: Minio, src: S3Uri, dest: Path, size: int, sha256: str | None, part_size: int, progress: _Progress
    ):
        self.client, self.src, self.dest, self.size, self.sha256 = client, src, dest, size, sha256
        self.progress = progress
        self.tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        step = _part_size_for(size, part_size)
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
        sha = whole_sha or sha256_file(self.tmp)
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


def _read_manifest(client: Minio, folder: S3Uri) -> dict | None:
    key = folder.prefix + MANIFEST_NAME

    def get() -> bytes | None:
        try:
            resp = client.get_object(folder.bucket, key)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                return None
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    body = with_retries(get, what=f"read manifest of {folder}")
    if body is None:
        return None
    try:
        manifest = json.loads(body)
        assert manifest["format"] == MANIFEST_FORMAT and isinstance(manifest["files"], list)
    except Exception as exc:
        raise StorageError(
            f"{folder}/{MANIFEST_NAME}: not a manifest this version understands ({exc!r}); rerun the "
            "step that wrote the folder"
        ) from exc
    return manifest


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
    client = _client(settings, str(uri), max_workers)
    try:
        # The manifest GET comes first: GET errors say what is wrong (HEAD errors have no body).
        manifest = _read_manifest(client, src)
        if manifest is not None:
            return _download_folder(client, src, manifest, Path(local_path), max_workers, part_size)
        stat = with_retries(lambda: _stat_or_none(client, src.bucket, src.key), what=f"stat {src}") if src.key else None
        if stat is not None and not getattr(stat, "is_dir", False):
            dest = Path(local_path)
            if dest.is_dir():
                dest = dest / src.key.rsplit("/", 1)[-1]
            sha = _meta_sha256(stat)
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
        raise _explain(exc, str(uri), settings) from exc


def _download_folder(client: Minio, src: S3Uri, manifest: dict, root: Path, max_workers: int, part_size: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    items = [
        (src.join(e["path"]), _safe_dest(root, e["path"], src), int(e["size"]), e["sha256"]) for e in manifest["files"]
    ]
    log.info(
        "downloading %d files (%s) from %s/ to %s with %d workers",
        len(items),
        _human(sum(i[2] for i in items)),
        src,
        root,
        max_workers,
    )
    _download_files(client, items, max_workers, part_size)
    return root


def _already_there(dest: Path, size: int, sha256: str | None) -> bool:
    return sha256 is not None and dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256


def _download_files(
    client: Minio, items: list[tuple[S3Uri, Path, int, str | None]], max_workers: int, part_size: int
) -> list[Path]:
    present = _run_parallel([lambda d=d, n=n, s=s: _already_there(d, n, s) for _, d, n, s in items], max_workers)
    todo = [item for item, done in zip(items, present) if not done]
    total = sum(n for _, _, n, _ in todo)
    progress = _Progress("downloaded", len(todo), total)
    if len(todo) < len(items):
        log.info("%d of %d files already present and intact, kept", len(items) - len(todo), len(items))
    jobs = [_FileDownload(client, src, dest, size, sha, part_size, progress) for src, dest, size, sha in todo]
    try:
        _run_parallel([t for job in jobs for t in job.tasks()], max_workers)
    finally:
        for job in jobs:
            job.cleanup()  # removes temporary files of anything that did not finish
    if todo:
        log.info("%s", progress.line())
    return [dest for _, dest, _, _ in items]


# ---------------------------------------------------------------------------------------------
# What steps call: local paths and S3 URIs alike


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
    "REGION_ENV",
    "RETRY",
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
