"""The rollout step: rollout → self-correction → preference pairs, into one output folder.

Files written to `output_dir`:
- rollouts.jsonl      k graded samples per question (appended as they arrive; reruns resume)
- corrections.jsonl   one record per wrong trajectory with its correction attempts (idem)
- pairs.jsonl         training pairs, TRL conversational preference format
- pairs_heldout.jsonl pairs of held-out questions (DPO's reward accuracy / margin and early stopping)
- rollout_stats.json  pass@1, pass@k, all-wrong / all-right shares, correction and pair statistics
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from medcritical.data.cmexam import Question
from medcritical.evaluation.diagnostics import diagnose_rollouts
from medcritical.io.jsonl import read_jsonl, write_jsonl
from medcritical.modeling.config import GenerationConfig
from medcritical.modeling.generation import Generator, load_generator
from medcritical.prompts import load_prompt
from medcritical.selfplay.config import SelfPlayConfig
from medcritical.selfplay.correction import correct_trajectories, correction_statistics
from medcritical.selfplay.pairs import build_preference_pairs
from medcritical.selfplay.records import check_resume_meta
from medcritical.selfplay.rollout import rollout_questions, rollout_statistics

log = logging.getLogger(__name__)

ROLLOUTS, CORRECTIONS = "rollouts.jsonl", "corrections.jsonl"
PAIRS, HELDOUT_PAIRS, STATS = "pairs.jsonl", "pairs_heldout.jsonl", "rollout_stats.json"
META = "rollout_meta.json"


def _check_questions(questions: Sequence[Question]) -> None:
    if not questions:
        raise ValueError("no training questions: the rollout needs at least one (check --questions)")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError("training questions have duplicate ids; rollout records are keyed by question id")


def run_rollout(
    config: SelfPlayConfig,
    generation: GenerationConfig,
    questions: Sequence[Question],
    model_path: str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    generator: Generator | None = None,
) -> dict:
    """Rollout, self-correction and pairs for one round; returns (and writes) the statistics.

    `generator` reuses a model already in memory; otherwise `model_path` is loaded with the
    generation backend of the recipe (transformers or vLLM).
    """
    _check_questions(questions)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rollout, correction = config.rollout, config.correction
    prompts = {
        "mcq": load_prompt("mcq", rollout.language).version,
        "correction": load_prompt("correction", correction.language).version,
    }
    # What rollouts.jsonl / corrections.jsonl depend on: resuming with other values would mix results.
    check_resume_meta(
        output_dir / META,
        {
            "model": str(model_path),
            "prompts": prompts,
            "rollout": rollout.model_dump(exclude={"chunk_size"}),
            "correction": correction.model_dump(),
            "seed": seed,
        },
    )
    generator = generator or load_generator(model_path, generation, device=device, dtype=dtype)
    records = rollout_questions(generator, questions, rollout, output_dir / ROLLOUTS, seed=seed)
    by_id = {q.id: q for q in questions}
    wrong = [r for r in records if not r["correct"]]
    corrections = correct_trajectories(
        generator, by_id, wrong if correction.attempts else [], correction, output_dir / CORRECTIONS,
        top_p=rollout.top_p, max_new_tokens=rollout.max_new_tokens, chunk_size=rollout.chunk_size, seed=seed,
    )
    stats = {
        "model": str(model_path),
        "prompts": prompts,
        "rollout": rollout_statistics(records, rollout.max_new_tokens),
        "correction": correction_statistics(corrections, correction.attempts),
        "format": diagnose_rollouts(records, by_id, rollout.max_new_tokens),  # empty/truncated shares, answers given
    }
    stats["pairs"] = write_pairs(config, questions, records, corrections, output_dir, seed=seed)
    (output_dir / STATS).write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    r = stats["rollout"]
    log.info(
        "rollout: pass@1 %.3f, pass@%d %.3f, all wrong %.3f, all right %.3f; %d/%d wrong trajectories corrected; %d pairs",
        r["pass@1"], rollout.samples_per_question, r["pass@k"], r["all_wrong"], r["all_right"],
        stats["correction"]["corrected"], len(wrong), stats["pairs"]["pairs"],
    )
    return stats


def write_pairs(
    config: SelfPlayConfig, questions: Sequence[Question], rollouts: list[dict], corrections: list[dict], output_dir: Path, *, seed: int = 0
) -> dict:
    train, heldout, stats = build_preference_pairs(
        questions, rollouts, corrections, config.pairs, language=config.rollout.language, seed=seed
    )
    write_jsonl(train, output_dir / PAIRS)
    write_jsonl(heldout, output_dir / HELDOUT_PAIRS)
    return stats


def make_pairs(
    config: SelfPlayConfig, questions: Sequence[Question], rollout_dir: str | Path, output_dir: str | Path, *, seed: int = 0
) -> dict:
    """Rebuild pairs from an earlier rollout's rollouts.jsonl / corrections.jsonl (e.g. with other
    pair settings) without generating anything. Writes pairs.jsonl, pairs_heldout.jsonl, pairs_stats.json."""
    rollout_dir, output_dir = Path(rollout_dir), Path(output_dir)
    if not (rollout_dir / ROLLOUTS).is_file():
        raise FileNotFoundError(f"{rollout_dir}: no {ROLLOUTS}; run `medcritical rollout --output {rollout_dir}` first")
    _check_questions(questions)
    known = {q.id for q in questions}
    rollouts = [r for r in read_jsonl(rollout_dir / ROLLOUTS) if r["question_id"] in known]
    if not rollouts:
        raise ValueError(f"{rollout_dir / ROLLOUTS}: no rollout record matches the given questions (wrong --questions file?)")
    corrections = [c for c in read_jsonl(rollout_dir / CORRECTIONS) if c["question_id"] in known]
    output_dir.mkdir(parents=True, exist_ok=True)
    stats = write_pairs(config, questions, rollouts, corrections, output_dir, seed=seed)
    (output_dir / "pairs_stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    return stats
