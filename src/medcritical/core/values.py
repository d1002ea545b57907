"""Plain values as people read and type them: a figure in a report, a table or a log line (`number_text`,
`percent`), and a NAME=VALUE assignment on a command line (`assignment`).

One formatter each, so the run report, the arms table, the evaluation report and the training log
write the same figure the same way; one parser, so `--set`, `--input`, `--param` and the arms' NAME=DIR
refuse a malformed assignment the same way.
"""

from __future__ import annotations

from medcritical.errors import InputError, UserError


def number_text(value, digits: int = 4, missing: str = "n/a") -> str:
    """A figure as text: a float to `digits` significant digits, whole from 1000 up (1234.5 -> "1234", not
    "1.234e+03"); an int or a text as is; None as `missing`. The statistics files keep full precision."""
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def percent(share: float) -> str:
    """A share (0.4234) as percent to one decimal ("42.3"); the caller writes the sign (a cell, a range)."""
    return f"{100 * share:.1f}"


def dotted(value, key: str):
    """The value at a dotted key ("pairs.diagnostics.tokens_ratio") of nested statistics: None where a part is
    missing, so a report cell says "-" for a stage that did not record it."""
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def assignment(
    text: str, *, option: str, form: str, example: str, error: type[UserError] = InputError
) -> tuple[str, str]:
    """`NAME=VALUE` typed after `option` (e.g. "--set") as (NAME, VALUE), NAME stripped; refused, naming the
    expected `form` ("key.sub=value") and an `example`, when there is no `=` or no NAME."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise error(f"{option} {text!r}: expected {form}, e.g. {option} {example}")
    return name.strip(), value
