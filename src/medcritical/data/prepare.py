"""The first pipeline step: load CMExam, split train/eval deterministically, check for leakage
(training questions that duplicate an evaluation question exactly, nearly or as a re-used vignette:
`splits.find_leaks`)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from medcritical.data.bundled import bundled_path
from medcritical.data.cmexam import DataError, Question, describe_bad_rows, load_questions, write_questions
from medcritical.data.config import BUNDLED, DataSection
from medcritical.data.splits import find_leaks, split_questions, take
from medcritical.errors import UserError

log = logging.getLogger(__name__)

TRAIN_FILE, EVAL_FILE, STATS_FILE = "train.jsonl", "eval.jsonl", "data_stats.json"


def _source_path(source: str) -> Path:
    return bundled_path() if source == BUNDLED else Path(source)


def _split(config: DataSection, seed: int):
    """(loaded source, loaded eval_source or None, training pool, evaluation questions) as `config` makes them."""
    eval_loaded = None
    loaded = load_questions(_source_path(config.source), on_bad_row=config.on_bad_row)
    if config.eval_source:
        eval_loaded = load_questions(_source_path(config.eval_source), on_bad_row=config.on_bad_row)
        train, evaluation = loaded.questions, eval_loaded.questions
        if config.eval_size:
            evaluation = take(evaluation, config.eval_size, seed)
    else:
        if config.eval_size is None:
            raise DataError(
                "data.eval_size is null but there is no data.eval_source: name the evaluation file, or give a number of questions to split off"
            )
        if config.eval_size > len(loaded.questions):
            raise DataError(
                f"data.eval_size is {config.eval_size}, more than the {len(loaded.questions)} usable questions "
                f"{config.source} gave: lower data.eval_size (the rest trains), or give a larger data.source"
            )
        train, evaluation = split_questions(loaded.questions, config.eval_size, seed)
    return loaded, eval_loaded, train, evaluation


def prepare_data(config: DataSection, seed: int, output_dir: str | Path) -> dict:
    """Write `train.jsonl`, `eval.jsonl` and `data_stats.json` (counts, bad rows, leakage) to output_dir."""
    output_dir = Path(output_dir)
    loaded, eval_loaded, train, evaluation = _split(config, seed)
    bad_rows = list(loaded.bad_rows) + (list(eval_loaded.bad_rows) if eval_loaded else [])
    # Against the whole training pool, before train_size samples it.
    leaks = find_leaks(train, evaluation)
    if leaks and config.on_leakage == "error":
        raise DataError(
            f"{len(leaks)} training questions also appear in the evaluation split, exactly or nearly (first: "
            f"training {leaks[0].train_id!r} ~ evaluation {leaks[0].eval_id!r}); set data.on_leakage: drop "
            "to remove them from training"
        )
    leaked_ids = {leak.train_id for leak in leaks}
    train = take([q for q in train if q.id not in leaked_ids], config.train_size, seed)
    if not train:
        raise DataError(
            f"{config.source}: no training question is left ({len(loaded.questions)} loaded, {len(evaluation)} taken "
            f"for evaluation, {len(leaked_ids)} dropped as leaked into it); lower data.eval_size, or give a "
            "data.eval_source other than the training file"
        )
    if bad_rows:
        rows = len(loaded.questions) + len(bad_rows) + (len(eval_loaded.questions) if eval_loaded else 0)
        log.warning("%s", describe_bad_rows(bad_rows, rows))
    for bad in bad_rows:
        log.debug("skipped bad row: %s", bad)
    stats = {
        "source": config.source,
        "eval_source": config.eval_source,
        "train": len(train),
        "eval": len(evaluation),
        "train_multi_answer": sum(q.is_multi_answer for q in train),
        "eval_multi_answer": sum(q.is_multi_answer for q in evaluation),
        "bad_rows": [{"file": b.file, "row": b.row, "reason": b.reason} for b in bad_rows],
        "leaked_dropped": sorted(leaked_ids),
        "leakage": {
            "exact": sum(leak.kind == "exact" for leak in leaks),
            "near": sum(leak.kind == "near" for leak in leaks),
            "ngram": sum(leak.kind == "ngram" for leak in leaks),
            "pairs": [asdict(leak) for leak in leaks],
        },
        "seed": seed,
    }
    write_questions(train, output_dir / TRAIN_FILE)
    write_questions(evaluation, output_dir / EVAL_FILE)
    (output_dir / STATS_FILE).write_text(json.dumps(stats, ensure_ascii=False, indent=2))
    log.info(
        "data: %d train, %d eval questions; %d bad rows skipped, %d leaked questions dropped",
        len(train),
        len(evaluation),
        len(bad_rows),
        len(leaks),
    )
    return stats


def check_given_questions(questions: list[Question], config: DataSection, seed: int, name: str) -> list[Question]:
    """Training questions given straight to a step (distill or rollout `--questions FILE`, not made by
    prepare-data), checked against the evaluation questions `config` makes, as prepare-data checks its
    own split: leaked ones dropped with a warning (`data.on_leakage: drop`) or an error. When those
    evaluation questions cannot be made, the questions are used unchecked and a warning says so."""
    try:
        evaluation = _split(config, seed)[3]
    except UserError as e:
        log.warning(
            "LEAKAGE NOT CHECKED: %s goes to training as given, and the recipe's evaluation questions could not "
            "be made to check it against (%s); pass the prepare-data folder instead",
            name,
            e,
        )
        return list(questions)
    leaks = find_leaks(questions, evaluation)
    if not leaks:
        log.info("leakage: none of the %d questions in %s duplicates an evaluation question", len(questions), name)
        return list(questions)
    first = f"first: {leaks[0].train_id!r} ~ evaluation {leaks[0].eval_id!r}, {leaks[0].kind}"
    if config.on_leakage == "error":
        raise DataError(
            f"{name}: {len(leaks)} of its {len(questions)} questions duplicate an evaluation question of the recipe's "
            f"data section ({first}); set data.on_leakage: drop to leave them out, or pass the prepare-data folder"
        )
    leaked = {leak.train_id for leak in leaks}
    kept = [q for q in questions if q.id not in leaked]
    log.warning(
        "LEAKAGE: %d of the %d questions in %s duplicate an evaluation question of the recipe's data section "
        "(%d exact, %d near, %d n-gram set; %s): dropped, %d left",
        len(leaks),
        len(questions),
        name,
        sum(leak.kind == "exact" for leak in leaks),
        sum(leak.kind == "near" for leak in leaks),
        sum(leak.kind == "ngram" for leak in leaks),
        first,
        len(kept),
    )
    if not kept:
        raise DataError(f"{name}: every question duplicates an evaluation question; nothing is left to train on")
    return kept
