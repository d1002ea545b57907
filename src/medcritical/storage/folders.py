"""Folders under an S3 prefix: list them, tell complete from incomplete, remove them, read one small object.

What a training step needs to keep its checkpoints in S3 (training/remote_checkpoints.py): a folder
uploaded by ``upload`` is complete once its ``_MANIFEST.json`` exists (written last), so a folder
without one is an upload that was cut off and must not be read.
"""

from __future__ import annotations

import io
import logging

from minio.deleteobjects import DeleteObject

from medcritical.io.manifest import MANIFEST_NAME
from medcritical.storage.client import S3Settings, connect, explain, read_object_or_none, with_retries
from medcritical.storage.transfer import stat_or_none
from medcritical.storage.uris import parse_s3_uri

log = logging.getLogger(__name__)


def list_folders(uri: str) -> list[str]:
    """The names of the folders directly under `uri` (``s3://b/run/checkpoints`` -> ["checkpoint-2", ...]) that
    hold at least one object, complete or not, sorted by name.

    Taken from the object keys, not from the server's list of prefixes: servers with a file system behind them
    (SeaweedFS) still list a folder whose objects were all deleted."""
    target = parse_s3_uri(uri)
    settings = S3Settings.from_env(uri)
    client = connect(settings, uri, 1)
    try:
        keys = with_retries(
            lambda: [o.object_name for o in client.list_objects(target.bucket, prefix=target.prefix, recursive=True)],
            what=f"list {target}/",
        )
    except Exception as exc:
        raise explain(exc, uri, settings) from exc
    return sorted({key[len(target.prefix) :].split("/", 1)[0] for key in keys if "/" in key[len(target.prefix) :]})


def is_complete_folder(uri: str) -> bool:
    """Whether the folder at `uri` was uploaded whole (its manifest, written last, exists)."""
    target = parse_s3_uri(uri).join(MANIFEST_NAME)
    settings = S3Settings.from_env(uri)
    client = connect(settings, uri, 1)
    try:
        return with_retries(lambda: stat_or_none(client, target.bucket, target.key), what=f"stat {target}") is not None
    except Exception as exc:
        raise explain(exc, uri, settings) from exc


def remove_folder(uri: str) -> int:
    """Delete every object under the folder `uri`, its manifest first (readers then see it as incomplete, never
    as a folder with files missing); returns how many objects were deleted."""
    target = parse_s3_uri(uri)
    settings = S3Settings.from_env(uri)
    client = connect(settings, uri, 1)
    manifest = target.join(MANIFEST_NAME)
    try:
        with_retries(lambda: client.remove_object(target.bucket, manifest.key), what=f"remove {manifest}")
        names = with_retries(
            lambda: [o.object_name for o in client.list_objects(target.bucket, prefix=target.prefix, recursive=True)],
            what=f"list {target}/",
        )

        def delete() -> list:
            return list(client.remove_objects(target.bucket, (DeleteObject(name) for name in names)))

        failures = with_retries(delete, what=f"remove {len(names)} objects under {target}/")
        if failures:
            raise RuntimeError(f"{target}/: {len(failures)} objects could not be removed (first: {failures[0]})")
    except Exception as exc:
        raise explain(exc, uri, settings) from exc
    log.info("%s/: removed (%d objects)", target, len(names))
    return len(names)


def read_small_object(uri: str) -> bytes | None:
    """The bytes of one small object (a fingerprint), or None when there is none."""
    target = parse_s3_uri(uri)
    settings = S3Settings.from_env(uri)
    client = connect(settings, uri, 1)
    try:
        return read_object_or_none(client, target)
    except Exception as exc:
        raise explain(exc, uri, settings) from exc


def write_small_object(uri: str, body: bytes) -> None:
    """Write one small object (a fingerprint) in one PUT: readers see the old or the new one, never half."""
    target = parse_s3_uri(uri)
    settings = S3Settings.from_env(uri)
    client = connect(settings, uri, 1)
    try:
        with_retries(
            lambda: client.put_object(target.bucket, target.key, io.BytesIO(body), len(body)), what=f"write {target}"
        )
    except Exception as exc:
        raise explain(exc, uri, settings) from exc
