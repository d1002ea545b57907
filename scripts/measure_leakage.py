"""Measure the leakage check's n-gram-set rule on CMExam val (docs/evaluation.md, "Leakage").

Two measurements, both printed:

1. Precision on real pairs: every pair of questions inside val.xlsx that the n-gram-set rule flags
   and the difflib rule does not, printed in full to be judged by reading (the figure in the docs is
   that reading, not computed here).
2. Recall on constructed vignettes: every val question with a long, single-answer stem, copied with
   its numbers changed, the sex swapped and its middle clauses reversed; how many copies each rule
   finds, and whether the one it finds is the question the copy was made from.

Usage: python scripts/measure_leakage.py [path/to/val.xlsx]
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from difflib import SequenceMatcher

from medcritical.data.cmexam import load_questions
from medcritical.data.splits import (
    COMMON_GRAM,
    NGRAM_MIN_CHARS,
    NGRAM_SIMILARITY,
    _bigrams,
    _gold_texts,
    _stem,
    find_leaks,
    masked_stem,
)


def flagged_pairs(questions):
    """Pairs inside one file the n-gram-set rule flags (all pairs, through a bigram index)."""
    long = [q for q in questions if len(_stem(q)) >= NGRAM_MIN_CHARS]
    grams = [_bigrams(masked_stem(q)) for q in long]
    index: dict[str, list[int]] = {}
    for i, g in enumerate(grams):
        for gram in g:
            index.setdefault(gram, []).append(i)
    index = {gram: ids for gram, ids in index.items() if len(ids) <= COMMON_GRAM}
    pairs = []
    for i, g in enumerate(grams):
        candidates = {j for gram in g for j in index.get(gram, ()) if j > i}
        for j in candidates:
            similarity = len(g & grams[j]) / len(g | grams[j])
            gold = _gold_texts(long[i])
            if similarity >= NGRAM_SIMILARITY and gold and gold == _gold_texts(long[j]):
                pairs.append((similarity, long[i], long[j]))
    return sorted(pairs, key=lambda p: -p[0])


def perturbed(q, n: int):
    """The question as a re-used vignette: other numbers, the other sex, middle clauses reversed."""
    stem = re.sub(r"\d+", lambda m: str(int(m.group()) + 3), q.question)
    stem = stem.translate(str.maketrans("男女", "女男"))
    clauses = re.split(r"(?<=[，。；])", stem)
    if len(clauses) > 3:
        clauses = [clauses[0], *reversed(clauses[1:-1]), clauses[-1]]
    return replace(q, id=f"copy{n}", question="".join(clauses))


def main(path: str) -> None:
    questions = load_questions(path).questions
    pairs = flagged_pairs(questions)
    new = [
        (s, a, b)
        for s, a, b in pairs
        if SequenceMatcher(None, _stem(a), _stem(b), autojunk=False).ratio() < 0.8  # not already near
    ]
    print(f"{len(pairs)} pairs inside {path} flagged by the n-gram-set rule, {len(new)} of them not by difflib:")
    for s, a, b in new:
        print(f"  {s:.2f}  [{a.id}] {a.question}\n        [{b.id}] {b.question}")
    originals = [q for q in questions if len(_stem(q)) >= 40 and not q.is_multi_answer]
    copies = [perturbed(q, n) for n, q in enumerate(originals)]
    source = {c.id: q.id for c, q in zip(copies, originals, strict=True)}
    changed = [c for c, q in zip(copies, originals, strict=True) if _stem(c) != _stem(q)]
    leaks = find_leaks(changed, originals)
    by_kind: dict[str, int] = {}
    other = []
    for leak in leaks:
        by_kind[leak.kind] = by_kind.get(leak.kind, 0) + 1
        if leak.eval_id != source[leak.train_id]:
            other.append((source[leak.train_id], leak.eval_id))
    print(
        f"{len(changed)} constructed copies of long single-answer stems (changed by the edit): found {len(leaks)} "
        f"{by_kind} (exact and near: the difflib rule alone; ngram: only the n-gram-set rule); "
        f"{len(other)} matched to another val question than their source (source, matched: read them): {other}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cmexam/val.xlsx")
