"""Reading the answer letters at a position of a model's text: "C", "(C)", "选项C", "A、C", "A, C and D", "A/C/D", and
the hedges "A或B", "A or B" (grader/__init__.py decides which positions are answer statements)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Between letters of one answer ("A、C", "A, C and D", "(A) and (C)", "A/C/D"), on one line only. A slash
# lists (models write a multi-answer set "A/C/D"); on a single-answer question a list grades wrong anyway.
_JOIN = re.compile(r"[ \t]*(?:,|;|、|&|\+|/|和|及|与|以及|\band\b)[ \t]*(?:\band\b[ \t]*)?|[ \t]+", re.IGNORECASE)
# Between letters of a hedge ("A或B", "A or B", "A还是B").
_HEDGE = re.compile(r"[ \t]*(?:或者?|还是|\bor\b)[ \t]*", re.IGNORECASE)
# Before a letter: "option C", "选项C", "第C项".
_PREFIX = re.compile(r"(?:(?:the\s+)?options?|choices?|选项|第)[ \t]*", re.IGNORECASE)
_OPEN_CLOSE = {"(": ")", "[": "]", "【": "】", "{": "}", "<": ">"}
# A letter is a letter (not the start of a word: "CT", "B超", "X-ray", "A型") when one of these
# follows it, or its own option text does ("C出血量").
_AFTER_LETTER = re.compile(
    r"$|[\s.,;:!?。，；：、！？()\[\]【】}<>\"”/|&+\\–—]|['’](?![A-Za-z])|[项选是为和及与或还因故即正对错的了]"
)


@dataclass(frozen=True)
class Letters:
    letters: str  # as written, uppercased, in order
    hedged: bool
    end: int  # index just after the last letter (and its closing bracket)


def _letter_at(
    text: str, pos: int, options: dict[str, str], first: bool, lower_ok: bool
) -> tuple[str, int, bool] | None:
    """(letters, end, written in capitals) of one letter token at `pos` ("C", "(C)", "option c", "ACD")."""
    prefix = _PREFIX.match(text, pos)
    if prefix:
        pos = prefix.end()
    close = ""
    if pos < len(text) and text[pos] in _OPEN_CLOSE:
        close = _OPEN_CLOSE[text[pos]]
        pos += 1
        while pos < len(text) and text[pos] in " \t":
            pos += 1
    run = re.match(r"[A-Z]+" if not lower_ok else r"[A-Z]+|[a-z](?![a-z])", text[pos:])
    if run is None:
        return None
    letters = run.group(0)
    end = pos + len(letters)
    if len(letters) > 1 and (len(set(letters)) < len(letters) or not set(letters) <= options.keys()):
        return None  # CT, MRI, COPD, HBV, AA: a word, not letters
    if close:
        inner = re.match(r"[ \t]*" + re.escape(close), text[end:])
        if inner is None:
            return None
        end += inner.end()
    elif letters in "ai" and re.match(r"[ \t]+[a-z]", text[end:]):
        return None  # "the answer is a stroke": an article, not option a
    if not close and not _AFTER_LETTER.match(text, end):
        echo = options.get(letters.upper(), "")
        if not (first and echo and text.startswith(echo, end)):
            return None
    return letters.upper(), end, letters.isupper()


def read_letters(text: str, pos: int, options: dict[str, str], lower_ok: bool = True) -> Letters | None:
    """The letters of an answer starting at `pos`, up to the end of their line or sentence."""
    token = _letter_at(text, pos, options, first=True, lower_ok=lower_ok)
    if token is None:
        return None
    letters, end, upper = token
    hedged = slashed = False
    while True:
        for joiner, is_hedge in ((_HEDGE, True), (_JOIN, False)):
            sep = joiner.match(text, end)
            if sep is None and not is_hedge and text[end : end + 1] in _OPEN_CLOSE:
                sep_end = end  # "(D)(E)"
            elif sep is not None:
                sep_end = sep.end()
            else:
                continue
            nxt = _letter_at(text, sep_end, options, first=False, lower_ok=lower_ok)
            # "c, d and e" or "C, D and E", but not "E, i.e. ..."
            if nxt is not None and nxt[2] == upper:
                slashed = slashed or "/" in text[end:sep_end]
                letters += nxt[0]
                end = nxt[1]
                hedged = hedged or is_hedge
                break
        else:
            # "ACD/ACDE": sets that share letters are alternatives, not one list.
            return Letters(letters, hedged or (slashed and len(set(letters)) < len(letters)), end)
