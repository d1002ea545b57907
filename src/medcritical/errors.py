"""The one base of errors a user can fix (a recipe value, a data file, an S3 setting, an output folder).

The CLI prints such an error's message (one or two sentences naming the input, the problem and the
fix) and exits 2 without a traceback; anything else is unexpected and keeps its traceback (exit 1).
"""


class UserError(Exception):
    """An input, setting or environment the user must fix; the message says how."""
