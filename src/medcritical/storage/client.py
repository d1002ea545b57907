"""The S3 client: where the server is (environment only), the one retry policy, and SDK errors explained.

Retries happen in one place, `with_retries`, around each unit of work: a small request, a whole file
upload, one byte range of a download. The HTTP pool under the SDK does not retry: a request-level
retry could not restart a download stream that broke halfway, and two layers would multiply the
attempts and the waiting.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from medcritical.storage.errors import (
    BucketNotFoundError,
    ObjectNotFoundError,
    StorageAuthError,
    StorageConfigError,
    StorageError,
)
from medcritical.storage.uris import S3Uri, is_s3, parse_s3_uri

if TYPE_CHECKING:
    from minio import Minio
# minio, urllib3 and certifi are imported where S3 is used: every pipeline task imports this package, and a
# run on local folders never needs them (minio alone is ~0.5 s of each task's start).

log = logging.getLogger(__name__)

ENDPOINT_ENV = "MEDCRITICAL_S3_ENDPOINT"
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"
REGION_ENV = "AWS_REGION"

T = TypeVar("T")


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


def connect(settings: S3Settings, uri: str, max_workers: int) -> Minio:
    """A client for `settings` with the credentials from the environment; `uri` names the work in errors."""
    access_key = os.environ.get(ACCESS_KEY_ENV, "")
    secret_key = os.environ.get(SECRET_KEY_ENV, "")
    if not access_key or not secret_key:
        missing = [n for n, v in ((ACCESS_KEY_ENV, access_key), (SECRET_KEY_ENV, secret_key)) if not v]
        raise StorageConfigError(
            f"{uri}: {' and '.join(missing)} not set; set {ACCESS_KEY_ENV} and {SECRET_KEY_ENV} to the "
            f"credentials for {settings.endpoint} (in Kubernetes, from the secret the step's manifest "
            "references)"
        )
    import certifi  # lazy: see the note at the imports
    import urllib3
    from minio import Minio

    # Our own pool: bounded timeouts (the SDK default is 5 minutes to connect), a connection per
    # worker, and no retries of its own (`with_retries` is the one retry layer).
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=15, read=120),
        maxsize=max(10, 2 * max_workers),
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=False,
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
# The one retry policy


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5  # seconds; doubles each attempt, with jitter
    max_delay: float = 20.0
    sleep: Callable[[float], None] = time.sleep


RETRY = RetryPolicy()  # module default; tests swap it for one that does not sleep

_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network trouble or a server-side 5xx. Never 403/404 or local file errors."""
    import urllib3  # lazy: see the note at the imports
    from minio.error import InvalidResponseError, S3Error, ServerError

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


# What S3 servers answer for an object that is not there (MinIO and AWS: NoSuchKey; some gateways: NoSuchObject).
_MISSING_OBJECT = ("NoSuchKey", "NoSuchObject")


def read_object_or_none(client: Minio, uri: S3Uri) -> bytes | None:
    """The bytes of one small object (a manifest, a fingerprint), or None when it does not exist; transient errors
    are retried like every other request."""

    from minio.error import S3Error  # lazy: see the note at the imports

    def get() -> bytes | None:
        try:
            response = client.get_object(uri.bucket, uri.key)
        except S3Error as exc:
            if exc.code in _MISSING_OBJECT:
                return None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    return with_retries(get, what=f"read {uri}")


@contextmanager
def s3_session(uri: str, max_workers: int = 1) -> Iterator[tuple[S3Uri, Minio]]:
    """(the parsed `uri`, a client for it) for a few requests; any error inside becomes a StorageError that says
    what to do (`explain`), naming `uri`."""
    target = parse_s3_uri(uri)
    settings = S3Settings.from_env(uri)
    client = connect(settings, uri, max_workers)
    try:
        yield target, client
    except Exception as exc:
        raise explain(exc, uri, settings) from exc


def explain(exc: BaseException, uri: str, settings: S3Settings) -> StorageError:
    """Turn an SDK or network error into a StorageError that says what to do."""
    from minio.error import InvalidResponseError, S3Error, ServerError  # lazy: see the note at the imports

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
