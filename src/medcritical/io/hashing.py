"""sha256 of files, text and JSON values: the project's one way to hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(text: str | bytes) -> str:
    return hashlib.sha256(text if isinstance(text, bytes) else text.encode("utf-8")).hexdigest()


def json_sha256(value: Any) -> str:
    """A stable hash of a JSON-able value (keys sorted)."""
    return text_sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str))
