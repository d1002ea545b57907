"""What goes wrong with storage: each message names the input, the problem and the fix."""

from __future__ import annotations

from medcritical.errors import UserError


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


class OutputTakenError(StorageError):
    """The output URI holds the results of other work (another fingerprint): refused, never overwritten."""


class ChecksumMismatchError(StorageError):
    """Transferred data does not match its recorded size or sha256."""
