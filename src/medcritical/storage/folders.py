"""Folders under an S3 prefix: list them, tell complete from incomplete, remove them, read one small object.

What a training step needs to keep its checkpoints in S3 (training/remote_checkpoints.py): a folder
uploaded by ``upload`` is complete once its ``_MANIFEST.json`` exists (written last), so a folder
without one is an upload that was cut off and must not be read.
"""

from __future__ import annotations

import io
import logging

from medcritical.io.manifest import MANIFEST_NAME
from medcritical.storage.client import read_object_or_none, s3_session, with_retries
from medcritical.storage.transfer import stat_or_none

log = logging.getLogger(__name__)


def list_folders(uri: str) -> list[str]:
    """The names of the folders directly under `uri` (``s3://b/run/checkpoints`` -> ["checkpoint-2", ...]) that
    hold at least one object, complete or not, sorted by name.

    Taken from the object keys, not from the server's list of prefixes: servers with a file system behind them
    (SeaweedFS) still list a folder whose objects were all deleted."""
    with s3_session(uri) as (target, client):
        keys = _keys_under(client, target)
    return sorted({key[len(target.prefix) :].split("/", 1)[0] for key in keys if "/" in key[len(target.prefix) :]})


def is_complete_folder(uri: str) -> bool:
    """Whether the folder at `uri` was uploaded whole (its manifest, written last, exists)."""
    with s3_session(uri) as (target, client):
        manifest = target.join(MANIFEST_NAME)
        found = with_retries(lambda: stat_or_none(client, manifest.bucket, manifest.key), what=f"stat {manifest}")
    return found is not None


def remove_folder(uri: str) -> int:
    """Delete every object under the folder `uri`, its manifest first (readers then see it as incomplete, never
    as a folder with files missing); returns how many objects were deleted."""
    from minio.deleteobjects import DeleteObject  # lazy: see storage.client's imports

    with s3_session(uri) as (target, client):
        manifest = target.join(MANIFEST_NAME)
        with_retries(lambda: client.remove_object(target.bucket, manifest.key), what=f"remove {manifest}")
        names = _keys_under(client, target)

        def delete() -> list:
            return list(client.remove_objects(target.bucket, (DeleteObject(name) for name in names)))

        failures = with_retries(delete, what=f"remove {len(names)} objects under {target}/")
        if failures:
            raise RuntimeError(f"{target}/: {len(failures)} objects could not be removed (first: {failures[0]})")
    log.info("%s/: removed (%d objects)", target, len(names))
    return len(names)


def read_small_object(uri: str) -> bytes | None:
    """The bytes of one small object (a fingerprint), or None when there is none."""
    with s3_session(uri) as (target, client):
        return read_object_or_none(client, target)


def write_small_object(uri: str, body: bytes) -> None:
    """Write one small object (a fingerprint) in one PUT: readers see the old or the new one, never half."""
    with s3_session(uri) as (target, client):
        with_retries(
            lambda: client.put_object(target.bucket, target.key, io.BytesIO(body), len(body)), what=f"write {target}"
        )


def _keys_under(client, target) -> list[str]:
    """Every object key under `target`'s prefix."""
    return with_retries(
        lambda: [o.object_name for o in client.list_objects(target.bucket, prefix=target.prefix, recursive=True)],
        what=f"list {target}/",
    )
