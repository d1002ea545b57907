"""``s3://bucket/key`` URIs: recognised, parsed and checked before any request."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from medcritical.storage.errors import StorageConfigError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def is_s3(uri: str | os.PathLike) -> bool:
    """Whether `uri` is an S3 URI; a malformed one (``s3:/bucket/x``, ``S3://...``, ``s3:bucket``) is an
    error, never a local folder named ``s3:``."""
    text = str(uri)
    if text.startswith("s3://"):
        return True
    if text[:3].lower() == "s3:":
        raise StorageConfigError(
            f"{text}: not a valid S3 URI (a local folder named '{text[:3]}' is not meant); write it as "
            f"s3://bucket/key, e.g. s3://{text[3:].lstrip(':/') or 'bucket/prefix'}"
        )
    return False


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
