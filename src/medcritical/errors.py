"""The one base of errors a user can fix (a recipe value, a data file, an S3 setting, an output folder).

The CLI prints such an error's message (one sentence naming the input, the problem and the fix) and
exits 2 without a traceback; anything else is unexpected and keeps its traceback (exit 1). Only
`UserError`s are shown that way: a ValueError raised by a bug must not pass for the user's mistake.

The subclasses also derive from the built-in type their callers may already catch (a missing input
is a FileNotFoundError too), so code that handles a missing optional file keeps working.
"""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """An input, setting or environment the user must fix; the message says how."""


class InputError(UserError, ValueError):
    """A value or a file's content that cannot be used (a bad row, a setting out of range, inputs
    that do not fit together)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named (or a step should have written) is not there."""


class StepError(UserError, RuntimeError):
    """A step cannot go on for a reason the user fixes (no GPU visible, an endpoint answering nothing)."""


class OutputError(UserError, OSError):
    """An output cannot be written: read-only folder, full disk, a file where a folder should be."""


# What the operating system says when an output cannot be written, and what to do about it.
_OS_FIXES = {
    errno.ENOSPC: "no space left on the device; free space or choose an output folder on another disk",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose an output folder on another disk",
    errno.EROFS: "the file system is read-only; choose a writable output folder",
    errno.EACCES: "permission denied; make it readable/writable for this user or choose another path",
    errno.EPERM: "operation not permitted; make it writable for this user or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; remove it or choose another path",
    errno.EISDIR: "it is a folder where a file is expected; remove it or choose another path",
    errno.EEXIST: "it exists already as something else; remove it or choose another path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
}


def explain_os_error(error: BaseException, where: str | None = None) -> UserError | None:
    """The user-fixable form of an operating system error about a path (disk full, read-only,
    permission denied, a file where a folder should be); None for anything else.

    These come from wherever the disk is written (a checkpoint, a JSONL log, a report), so they are
    translated once, where the command ends, naming the path the system named (or `where`, the
    output being written, when it named none)."""
    if not isinstance(error, OSError) or isinstance(error, UserError):
        return None
    fix = _OS_FIXES.get(error.errno or 0)
    if fix is None:
        return None
    if error.filename is not None:
        where = os.fsdecode(error.filename)
    elif where is not None:  # a failed write() names no file: the output being written
        where = f"writing {where}"
    return OutputError(f"{where or 'writing a file'}: {fix}")
