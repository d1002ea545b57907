"""The rollout step: rollout → correction → standalone chosen answers → preference pairs, into one folder.

Files written to `output_dir`:
- rollouts.jsonl      k graded samples per question (appended as they arrive; reruns resume)
- corrections.jsonl   one record per wrong trajectory: its correction votes, rewrite and verdict (idem)
- timings.jsonl       seconds spent per finished chunk of rollout, correction and rewrite (idem)
- fingerprint.json    what the three logs depend on (a rerun with other inputs stops, or --restart), and once
                      the pairs and statistics are written, the pairs settings and prices (io/finished.py)
- pairs.jsonl         training pairs, TRL conversational preference format
- pairs_heldout.jsonl pairs of held-out questions (DPO's reward accuracy / margin and early stopping)
- rollout_stats.json  pass@1, pass@k, all-wrong / all-right shares, correction statistics (with what
                      guessing alone would have got accepted), pair statistics and diagnostics, cost
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from medcritical.analysis.diagnostics import diagnose_rollouts
from medcritical.data.cmexam import Question
from medcritical.distill.teachers import TEACHER_ENV_PREFIX, build_teacher
from medcritical.distill.traces import DistillPrompts
from medcritical.errors import InputError, MissingInputError
from medcritical.io.fingerprint import check_resume, model_fingerprint, questions_fingerprint
from medcritical.io.finished import forget_finished, record_finished
from medcritical.io.jsonl import read_jsonl, write_jsonl
from medcritical.modeling import resolve_model
from medcritical.modeling.config import GenerationSection
from medcritical.modeling.generation import Generator, generation_setup, generator_for
from medcritical.modeling.llm_client import safe_url
from medcritical.prompts import load_prompt
from medcritical.selfplay.config import SelfPlaySection
from medcritical.selfplay.correction import SelfCorrector, TeacherCorrector, correct_trajectories, correction_statistics
from medcritical.selfplay.cost import TIMINGS, accelerators, cost_statistics
from medcritical.selfplay.pairs import build_preference_pairs
from medcritical.selfplay.rollout import rollout_questions, rollout_statistics

log = logging.getLogger(__name__)

ROLLOUTS, CORRECTIONS = "rollouts.jsonl", "corrections.jsonl"
PAIRS, HELDOUT_PAIRS, STATS = "pairs.jsonl", "pairs_heldout.jsonl", "rollout_stats.json"


def _check_questions(questions: Sequence[Question]) -> None:
    if not questions:
        raise InputError("no training questions: the rollout needs at least one (check --questions)")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise InputError("training questions have duplicate ids; rollout records are keyed by question id")


def _teacher_settings(distill) -> dict:
    """What of the `distill` section a teacher's corrections depend on (never credentials): the endpoint's
    model and address as resolved (a recipe may leave them to MEDCRITICAL_TEACHER_MODEL / _BASE_URL), a
    local teacher's weights and dtype, and the prompts' language."""
    keys = ("backend", "teacher_model", "temperature", "top_p", "max_new_tokens", "explanation_max_chars", "language")
    settings = {k: getattr(distill, k) for k in keys}
    if distill.backend == "openai":
        base_url = distill.openai.base_url or os.environ.get(f"{TEACHER_ENV_PREFIX}_BASE_URL")
        settings["openai"] = {
            "base_url": safe_url(base_url) if base_url else None,
            "model": distill.openai.model or os.environ.get(f"{TEACHER_ENV_PREFIX}_MODEL"),
            "extra_body": distill.openai.extra_body,
        }
    elif distill.backend in ("transformers", "vllm", "vllm-server") and distill.teacher_model:
        settings["weights"] = model_fingerprint(resolve_model(distill.teacher_model))
        settings["dtype"] = distill.local.dtype if distill.backend != "vllm-server" else distill.server.dtype
    return settings


def rollout_prompts(config: SelfPlaySection) -> dict:
    """The versions (content hashes) of the prompt files a round's samples, votes and rewrites come from."""
    rollout, correction = config.rollout, config.correction
    return {
        "mcq": load_prompt("mcq", rollout.language).version,
        "correction": load_prompt("correction", correction.language).version,
        "rewrite": load_prompt("rewrite", correction.language).version,
    }


def rollout_fingerprint(
    config: SelfPlaySection,
    generation: GenerationSection,
    questions: Sequence[Question],
    model_path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    distill=None,
) -> dict:
    """What the rollout's outputs depend on. The three logs (rollouts, corrections, timings; resuming them with
    other values would mix results): the questions, the student's weights, the prompts, the rollout and
    correction settings, the corrector (a teacher as resolved from the environment), the seed, and the backend
    and resolved dtype the student samples with (the same seeds sample differently on another backend or
    dtype). Beyond them, the pairs and statistics (`FINISHED_ONLY`, recorded once they are written): the
    `selfplay.pairs` settings and the prices the cost is counted in."""
    return {
        "questions": questions_fingerprint(questions),
        "model": model_fingerprint(model_path),
        "prompts": rollout_prompts(config),
        "rollout": config.rollout.model_dump(exclude={"chunk_size"}),
        "correction": config.correction.model_dump(),
        "corrector": config.corrector,
        "teacher": _teacher_settings(distill) if config.corrector == "teacher" else None,
        "seed": seed,
        "generation": generation_setup(generation.backend, device, dtype),
        "pairs": config.pairs.model_dump(mode="json"),
        "cost": config.cost.model_dump(mode="json")
        | {"teacher_price_per_million_tokens": _teacher_price(config, distill)},
    }


# What only the pairs and the statistics depend on: a change rebuilds them from the logs, which stay.
FINISHED_ONLY = ("pairs", "cost")


def _teacher_price(config: SelfPlaySection, distill) -> float | None:
    """The correcting teacher's price per million tokens: selfplay.cost's, else the distillation teacher's."""
    price = config.cost.teacher_price_per_million_tokens
    if price is None and distill is not None and config.corrector == "teacher":
        price = distill.price_per_million_tokens
    return price


def build_corrector(config: SelfPlaySection, generator: Generator, distill=None, *, device: str = "auto"):
    """The student itself, or the distillation teacher of the recipe's `distill` section."""
    if config.corrector == "self":
        return SelfCorrector(generator)
    if distill is None:
        raise InputError("selfplay.corrector is 'teacher' but no distill section was given to the rollout step")

    teacher = build_teacher(distill, DistillPrompts.load(distill.language), device=device)
    return TeacherCorrector(teacher, max_new_tokens=distill.max_new_tokens)


def run_rollout(
    config: SelfPlaySection,
    generation: GenerationSection,
    questions: Sequence[Question],
    model_path: str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    generator: Generator | None = None,
    distill=None,
    restart: bool = False,
) -> dict:
    """Rollout, correction and pairs for one round; returns (and writes) the statistics.

    `generator` reuses a model already in memory; otherwise `model_path` is loaded with the
    generation backend of the recipe (transformers or vLLM). `distill` (the recipe's DistillSection)
    names the teacher when `config.corrector` is "teacher". `restart` discards earlier results made
    from other inputs instead of refusing to mix them. Logs already in `output_dir` from the same inputs
    are resumed; the pairs and statistics are rebuilt from them, and the whole fingerprint is recorded last.
    """
    _check_questions(questions)
    output_dir = Path(output_dir)
    fingerprint = rollout_fingerprint(
        config, generation, questions, model_path, device=device, dtype=dtype, seed=seed, distill=distill
    )
    finished = {key: fingerprint.pop(key) for key in FINISHED_ONLY}
    forget_finished(output_dir, FINISHED_ONLY)  # the folder is unfinished until the pairs are rebuilt
    check_resume(output_dir, fingerprint, outputs=[ROLLOUTS, CORRECTIONS, TIMINGS], restart=restart)
    with contextlib.ExitStack() as owned:  # what is loaded here is closed once generation is done
        generator = owned.enter_context(generator_for(generator, model_path, generation, device=device, dtype=dtype))
        records = rollout_questions(
            generator, questions, config.rollout, output_dir / ROLLOUTS, seed=seed, timings=output_dir / TIMINGS
        )
        corrector, corrections = _correct(
            config, generator, questions, records, output_dir, owned, seed, distill, device
        )
    stats = {
        "model": str(model_path),
        "prompts": fingerprint["prompts"],
        "corrector": corrector.description if corrector else {"corrector": config.corrector},
        **_round_statistics(config, questions, records, corrections),
    }
    stats["pairs"] = write_pairs(config, questions, records, corrections, output_dir, seed=seed)
    stats["cost"] = _cost(config, generation, records, corrections, output_dir, device=device, distill=distill)
    (output_dir / STATS).write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    record_finished(output_dir, finished)
    _log_summary(stats, config.rollout.samples_per_question, sum(not r["correct"] for r in records))
    return stats


def _correct(config, generator, questions, records, output_dir: Path, owned, seed: int, distill, device: str):
    """The corrector (None when nothing is to be corrected) and the corrections of the wrong trajectories;
    a teacher built here is closed with what `owned` holds."""
    correction = config.correction
    wrong = [r for r in records if not r["correct"]] if correction.attempts else []
    corrector = build_corrector(config, generator, distill, device=device) if wrong else None
    if isinstance(corrector, TeacherCorrector):
        owned.callback(corrector.teacher.close)
    corrections = correct_trajectories(
        generator,
        {q.id: q for q in questions},
        wrong,
        correction,
        output_dir / CORRECTIONS,
        corrector=corrector,
        top_p=config.rollout.top_p,
        max_new_tokens=config.rollout.max_new_tokens,
        chunk_size=config.rollout.chunk_size,
        seed=seed,
        timings=output_dir / TIMINGS,
    )
    return corrector, corrections


def _round_statistics(config: SelfPlaySection, questions, records: list[dict], corrections: list[dict]) -> dict:
    """The rollout, correction and format statistics."""
    by_id, max_new_tokens = {q.id: q for q in questions}, config.rollout.max_new_tokens
    return {
        "rollout": rollout_statistics(records, max_new_tokens),
        # The rejected answers, for the placebo: its stand-in gold is never the answer the corrector was shown.
        "correction": correction_statistics(
            corrections, config.correction, by_id, {(r["question_id"], r["sample"]): r["predicted"] for r in records}
        ),
        "format": diagnose_rollouts(records, by_id, max_new_tokens),  # empty/truncated shares, answers given
    }


def _cost(config, generation, records, corrections, output_dir: Path, *, device: str, distill) -> dict:
    """What the round's pairs cost, from the tokens counted and the seconds in timings.jsonl."""
    return cost_statistics(
        records,
        corrections,
        read_jsonl(output_dir / PAIRS) + read_jsonl(output_dir / HELDOUT_PAIRS),
        output_dir / TIMINGS,
        # The GPUs generation ran on, not every GPU the machine shows.
        gpus=accelerators(device, generation.tensor_parallel_size if generation.backend == "vllm" else 1),
        teacher_price_per_million_tokens=_teacher_price(config, distill),
        device_hour_price=config.cost.device_hour_price,
        currency=config.cost.currency,
    )


def _log_summary(stats: dict, k: int, wrong: int) -> None:
    r, c = stats["rollout"], stats["correction"]
    log.info(
        "rollout: pass@1 %.3f, pass@%d %.3f, all wrong %.3f, all right %.3f; %d/%d wrong trajectories corrected "
        "(by chance: %s analytic lower bound, %s placebo: %s on attempts that ran + %s attempts that stopped early "
        "counted at the measured rate, rewrites assumed to follow, not run); %d pairs",
        r["pass@1"],
        k,
        r["pass@k"],
        r["all_wrong"],
        r["all_right"],
        c["corrected"],
        wrong,
        f"{c['expected_by_guessing']:.1f}" if "expected_by_guessing" in c else "-",
        f"{c['placebo']['expected']:.1f}" if "placebo" in c else "-",
        f"{c['placebo']['expected_observed']:.1f}" if "placebo" in c else "-",
        c["placebo"]["imputed_attempts"] if "placebo" in c else "-",
        stats["pairs"]["pairs"],
    )


def write_pairs(
    config: SelfPlaySection,
    questions: Sequence[Question],
    rollouts: list[dict],
    corrections: list[dict],
    output_dir: Path,
    *,
    seed: int = 0,
) -> dict:
    train, heldout, stats = build_preference_pairs(
        questions, rollouts, corrections, config.pairs, language=config.rollout.language, seed=seed
    )
    write_jsonl(train, output_dir / PAIRS)
    write_jsonl(heldout, output_dir / HELDOUT_PAIRS)
    return stats


def make_pairs(
    config: SelfPlaySection,
    questions: Sequence[Question],
    rollout_dir: str | Path,
    output_dir: str | Path,
    *,
    seed: int = 0,
) -> dict:
    """Rebuild pairs from an earlier rollout's rollouts.jsonl / corrections.jsonl (e.g. with other
    pair settings) without generating anything. Writes pairs.jsonl, pairs_heldout.jsonl, pairs_stats.json."""
    rollout_dir, output_dir = Path(rollout_dir), Path(output_dir)
    if not (rollout_dir / ROLLOUTS).is_file():
        raise MissingInputError(f"{rollout_dir}: no {ROLLOUTS}; run `medcritical rollout --output {rollout_dir}` first")
    _check_questions(questions)
    known = {q.id for q in questions}
    rollouts = [r for r in read_jsonl(rollout_dir / ROLLOUTS) if r["question_id"] in known]
    if not rollouts:
        raise InputError(
            f"{rollout_dir / ROLLOUTS}: no rollout record matches the given questions (wrong --questions file?)"
        )
    corrections = [c for c in read_jsonl(rollout_dir / CORRECTIONS) if c["question_id"] in known]
    output_dir.mkdir(parents=True, exist_ok=True)
    stats = write_pairs(config, questions, rollouts, corrections, output_dir, seed=seed)
    (output_dir / "pairs_stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    return stats
