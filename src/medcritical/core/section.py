"""Base of every recipe section (see medcritical.orchestration.recipe), and the checks sections share."""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

from medcritical.storage.errors import StorageError
from medcritical.storage.uris import is_s3, parse_s3_uri


def _types(annotation: Any) -> set:
    """Every type in an annotation (`int | None` -> {int, NoneType})."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return {typing.Literal}
    return set().union(*map(_types, args)) if args else {annotation}


def _counts_or_rates(annotation: Any) -> bool:
    """A numeric field that takes no true/false (pydantic would read true as 1)."""
    types = _types(annotation)
    return bool(types & {int, float}) and bool not in types and Any not in types


class Section(BaseModel):
    """Unknown keys are errors, not silently ignored; assignments are validated too; NaN and infinity
    are no number a setting can take, and true/false is no count or rate (YAML reads `yes` as true)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name:
            field = cls.model_fields.get(info.field_name)
            if field is not None and _counts_or_rates(field.annotation):
                raise ValueError(f"{str(value).lower()} is not a number; give a number")
        return value


def check_uri(value: str, what: str = "a path") -> str:
    """A local path or a well-formed s3://bucket/key URI (`s3:/bucket/x` is no local folder); raises
    ValueError (for pydantic) naming the problem and the fix."""
    if not value.strip():
        raise ValueError(f"is blank; give {what} or an s3://bucket/prefix URI")
    try:
        if is_s3(value):
            parse_s3_uri(value)
    except StorageError as e:
        raise ValueError(str(e)) from None
    return value


def check_output_uri(value: str) -> str:
    return check_uri(value, "an output folder")


def _base_url(value: str | None) -> str | None:
    """An endpoint's base URL: http(s)://host[:port]/path (null: from the environment)."""
    if value is None:
        return None
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError on a port that is no number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL; write it as http://host:port/v1")
    return value.strip()


def _env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits, _), e.g. MY_API_KEY")
    return value


BaseUrl = Annotated[str | None, AfterValidator(_base_url)]
EnvName = Annotated[str, AfterValidator(_env_name)]
