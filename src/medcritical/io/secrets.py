"""Secrets are never written: every file the project writes through `io.jsonl`, and every reply a chat
endpoint sends, has each configured secret replaced by ``***``.

A secret is configured when a client is made with it (`register_secret`: an endpoint's API key, the
S3 secret key) or sits in one of the well-known variables below. A server that echoes the key inside
its reply (a debug field, an error text quoting the request) must not put it into distill_raw.jsonl,
rejected.jsonl, judgements.jsonl or graded.jsonl.
"""

from __future__ import annotations

import json
import os

MASK = "***"
# Variables that hold secrets whoever reads them; the API keys of endpoints named by a recipe's
# api_key_env are registered when their client is made.
SECRET_ENV = (
    "MEDCRITICAL_TEACHER_API_KEY",
    "MEDCRITICAL_JUDGE_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
# Shorter values would mask ordinary words and digits; no real key is this short.
MIN_LENGTH = 6

_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask `value` in everything written from now on (a no-op for None and very short values)."""
    if value and len(value) >= MIN_LENGTH:
        _registered.add(value)


def secrets() -> list[str]:
    """Every configured secret, longest first (a key that contains another is masked whole)."""
    found = set(_registered)
    found.update(v for name in SECRET_ENV if len(v := os.environ.get(name, "")) >= MIN_LENGTH)
    return sorted(found, key=len, reverse=True)


def mask_secrets(text: str) -> str:
    """`text` with every configured secret replaced by ***, also where it appears JSON-escaped."""
    for secret in secrets():
        if secret in text:
            text = text.replace(secret, MASK)
        escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
        if escaped != secret and escaped in text:
            text = text.replace(escaped, MASK)
    return text
