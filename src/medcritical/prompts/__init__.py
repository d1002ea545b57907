"""Prompts as files: `<name>.<language>.txt` beside this module, versioned by content hash.

A step records `Prompt.version` (name, language and the first 12 hex of the text's sha256) in its
metadata, so any output can be traced to the exact wording that produced it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from medcritical.errors import MissingInputError


@dataclass(frozen=True)
class Prompt:
    name: str
    language: str
    text: str

    @property
    def version(self) -> str:
        digest = hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]
        return f"{self.name}.{self.language}@{digest}"

    def format(self, **fields: str) -> str:
        return self.text.format(**fields)


@cache
def load_prompt(name: str, language: str = "zh") -> Prompt:
    path = resources.files(__name__) / f"{name}.{language}.txt"
    if not path.is_file():
        available = sorted(p.name for p in resources.files(__name__).iterdir() if p.name.endswith(".txt"))
        raise MissingInputError(f"no prompt {name!r} in language {language!r}; available: {available}")
    return Prompt(name, language, path.read_text(encoding="utf-8").strip())


def format_options(options: dict[str, str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def mcq_messages(question, language: str = "zh") -> list[dict[str, str]]:
    """The student's prompt for a question with its options: one wording for SFT data, rollout and
    evaluation, so the model is always asked the way it was trained."""
    text = load_prompt("mcq", language).format(question=question.question, options=format_options(question.options))
    return [{"role": "user", "content": text}]


def open_messages(question, language: str = "zh") -> list[dict[str, str]]:
    """The question without options (the judge protocol)."""
    return [{"role": "user", "content": load_prompt("open", language).format(question=question.question)}]
