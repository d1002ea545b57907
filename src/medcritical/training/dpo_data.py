"""DPO's preference pairs: read and checked, split into training and held-out pairs, trimmed to max_length."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from medcritical.errors import InputError, MissingInputError
from medcritical.io.jsonl import read_input_jsonl

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def read_pairs(path: str | Path) -> list[dict]:
    """Preference rows (TRL conversational format); metadata columns are dropped. Clear errors on bad rows."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: no such pairs file (`medcritical rollout` writes pairs.jsonl)")
    pairs = []
    for number, row in read_input_jsonl(path, "pairs"):  # UTF-8, one object per line, 1-based lines
        bad = [
            c
            for c in PAIR_COLUMNS
            if not (
                isinstance(row.get(c), list)
                and row[c]
                and all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in row[c])
            )
        ]
        if bad:
            raise InputError(
                f"{path}: line {number}: {', '.join(bad)} must be a non-empty list of chat messages "
                "({role, content: text}); pairs come from `medcritical rollout` / `medcritical pairs`"
            )
        if row["chosen"][-1]["role"] != "assistant" or row["rejected"][-1]["role"] != "assistant":
            raise InputError(f"{path}: line {number}: chosen and rejected must end with an assistant message")
        if row["chosen"] == row["rejected"]:
            # DPO's loss has no gradient on such a pair: it would train on nothing and report a margin of 0.
            raise InputError(
                f"{path}: line {number}: chosen and rejected are the same conversation, so the pair prefers "
                "nothing; remove the line (pairs from `medcritical rollout` always differ)"
            )
        pairs.append({c: row[c] for c in PAIR_COLUMNS})
    return pairs


def split_heldout(pairs: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(selection, reporting): the held-out pairs in two halves by whole question (a question's pairs share
    their prompt), chosen by a seeded hash. The checkpoint that is kept (restore_best) and the step training
    stops at (early stopping) are picked on the selection half; the kept model's figures are measured on
    the reporting half, which played no part in picking it. Fewer than two questions: no reporting half."""
    groups: dict[str, list[dict]] = {}
    for pair in pairs:
        groups.setdefault(json.dumps(pair["prompt"], ensure_ascii=False, sort_keys=True), []).append(pair)
    if len(groups) < 2:
        return list(pairs), []
    ranked = sorted(groups, key=lambda key: hashlib.sha256(f"{seed}\x1f{key}".encode()).hexdigest())
    selection_keys = set(ranked[: (len(ranked) + 1) // 2])
    selection = [p for key in ranked if key in selection_keys for p in groups[key]]
    reporting = [p for key in ranked if key not in selection_keys for p in groups[key]]
    return selection, reporting


def drop_too_long(pairs: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Drop pairs whose prompt + chosen or prompt + rejected exceed max_length: TRL would cut their ends,
    and the end holds the answer that makes chosen better than rejected."""
    kept = []
    for pair in pairs:
        longest = max(
            len(
                tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=True, return_dict=True)["input_ids"]
            )
            for side in ("chosen", "rejected")
        )
        if longest <= max_length:
            kept.append(pair)
    return kept, len(pairs) - len(kept)
