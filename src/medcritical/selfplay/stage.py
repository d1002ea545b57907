"""The self-play round's two stages (see medcritical.core.stage): rollout, then DPO on its pairs.

rollout: training questions + the current model → rollouts, corrections, preference pairs
dpo:     the pairs + the same model → the next round's model (and pass@1 on the round's questions, and
         rounds.json: every round's statistics so far)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medcritical.core.stage import MODEL, OUTPUT_URI, Input, Stage
from medcritical.data.cmexam import load_questions
from medcritical.data.prepare import TRAIN_FILE
from medcritical.errors import InputError
from medcritical.io.fingerprint import FINGERPRINT_FILE
from medcritical.io.jsonl import read_jsonl
from medcritical.io.manifest import MANIFEST_NAME
from medcritical.io.ranks import is_main_process
from medcritical.selfplay.cost import TIMINGS
from medcritical.selfplay.run import (
    CORRECTIONS,
    HELDOUT_PAIRS,
    PAIRS,
    ROLLOUTS,
    STATS,
    rollout_fingerprint,
    run_rollout,
)
from medcritical.selfplay.train_pass import TRAIN_PASS, TRAIN_PASS_STATS, train_pass
from medcritical.training.fingerprints import dpo_fingerprint
from medcritical.training.stage import CHECKPOINTS

log = logging.getLogger(__name__)

DPO_METRICS = "dpo_metrics.json"
# Every round's statistics so far, as a list of {"rollout", "dpo", "train_pass"} (the rollout's statistics, the
# DPO's, pass@1 before → after DPO; None where a file is missing): each DPO round writes it from the previous round's
# list (its declared input `previous_rounds`) and its own, so the last round's file holds them all for the report.
ROUNDS_FILE = "rounds.json"
ROUND_KEYS = ("rollout", "dpo", "train_pass")


def _rollout(recipe, output_dir: Path, *, data: Path, model: Path, restart: bool = False) -> dict:
    return run_rollout(
        *_rollout_arguments(recipe, data, model), output_dir, **_rollout_options(recipe), restart=restart
    )


def _rollout_fingerprint(recipe, *, data: Path, model: Path, **_options) -> dict:
    """What `run_rollout` records once its pairs and statistics are written: the logs' inputs and settings,
    the pairs settings and the prices."""
    return rollout_fingerprint(*_rollout_arguments(recipe, data, model), **_rollout_options(recipe))


def _rollout_arguments(recipe, data: Path, model: Path) -> tuple:
    return recipe.selfplay, recipe.generation, load_questions(data, recipe.data.on_bad_row).questions, model


def _rollout_options(recipe) -> dict:
    return {
        "device": recipe.run.device,
        "dtype": recipe.model.dtype,
        "seed": recipe.run.seed,
        "distill": recipe.distill,  # the teacher, when selfplay.corrector is "teacher"
    }


def _files_in_recipe(recipe) -> tuple[str, ...]:
    # The teacher corrector asks stage 1's teacher (distill.teacher_model), which may be a local model in S3.
    return ("distill.teacher_model",) if recipe.selfplay.corrector == "teacher" else ()


ROLLOUT = Stage(
    name="rollout",
    folder="rollout",
    section="selfplay",
    run=_rollout,
    inputs={"data": Input(TRAIN_FILE, default_stage="prepare_data"), "model": MODEL},
    outputs=(ROLLOUTS, CORRECTIONS, TIMINGS, FINGERPRINT_FILE, PAIRS, HELDOUT_PAIRS, STATS),
    stats=STATS,
    fingerprint=FINGERPRINT_FILE,
    options=("restart",),
    recipe_files=_files_in_recipe,
    optional=(CORRECTIONS,),  # none when no trajectory was wrong, or selfplay.correction.attempts is 0
    # Recorded once the pairs and statistics are written (selfplay.run.run_rollout): a folder whose logs are
    # resumed, or whose pairs are rebuilt with other selfplay.pairs settings, reads as unfinished meanwhile.
    expected_fingerprint=_rollout_fingerprint,
)


def _dpo(
    recipe,
    output_dir: Path,
    *,
    rollout: Path,
    heldout: Path | None,
    rollouts: Path | None,
    model: Path,
    data: Path | None,
    rollout_stats: Path | None = None,
    previous_rounds: Path | None = None,
    restart=False,
    output_uri: str | None = None,
) -> dict:
    # The trainer (TRL, peft, datasets: ~4 s to import) loads when DPO runs, not with the declarations.
    from medcritical.training.dpo import train_dpo

    result = train_dpo(
        recipe.selfplay.dpo,
        rollout,
        heldout,
        model,
        output_dir,
        device=recipe.run.device,
        dtype=recipe.model.dtype,
        seed=recipe.run.seed,
        restart=restart,
        output_uri=output_uri,
    )
    if not is_main_process():
        return result
    if result.get("status") != "skipped":
        # Written whether measured or not: the runner counts a DPO folder without it as unfinished (a run killed
        # while measuring is measured again, not returned without its figure).
        if recipe.evaluate.train_pass_questions == 0:
            result["train_pass"] = _not_measured(output_dir, "evaluate.train_pass_questions is 0", turned_off=True)
        else:
            result["train_pass"] = measure_train_pass(recipe, rollouts, data, Path(result["model"]), output_dir)
    # Written last, a skipped round's too (the report shows why it did not train): required as well.
    write_rounds(output_dir, previous_rounds, rollout_stats)
    return result


def write_rounds(output_dir: Path, previous_rounds: Path | None, rollout_stats: Path | None) -> list[dict]:
    """The rounds file (ROUNDS_FILE): the previous round's list, when there is one, and this round's statistics,
    read back from their files (the rollout's beside its pairs, this DPO's in `output_dir`) as the report shows them."""
    rounds = _read_json(previous_rounds) if previous_rounds else []
    if not isinstance(rounds, list):
        raise InputError(f"{previous_rounds}: not a list of rounds; give a DPO round's folder as previous_rounds")
    files = dict(zip(ROUND_KEYS, (rollout_stats, output_dir / DPO_METRICS, output_dir / TRAIN_PASS_STATS), strict=True))
    rounds.append({key: _read_json(path) if path and path.is_file() else None for key, path in files.items()})
    text = json.dumps(rounds, ensure_ascii=False, indent=2)
    (output_dir / ROUNDS_FILE).write_text(text, encoding="utf-8")
    return rounds


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def measure_train_pass(recipe, rollouts: Path | None, data: Path | None, model: Path, output_dir: Path) -> dict:
    """pass@1 on the round's training questions before (its rollout) and after DPO (evaluate.train_pass_questions).

    When it cannot be measured, its statistics file says why ({"status": "not measured", "reason": ...}), which the
    run report shows: never skipped without a word."""
    if data is None:
        return _not_measured(output_dir, f"no training questions (the data stage's {TRAIN_FILE}; give the data input)")
    if rollouts is None:
        return _not_measured(output_dir, f"no {ROLLOUTS} beside the pairs (the rollouts input)")
    before = read_jsonl(rollouts)
    if not before:
        return _not_measured(output_dir, f"{rollouts.name} beside the pairs holds no rollout")
    return train_pass(
        recipe.selfplay.rollout,
        recipe.generation.model_copy(update={"backend": "transformers"}),  # the training image has no vLLM
        load_questions(data, recipe.data.on_bad_row).questions,
        before,
        model,
        output_dir,
        limit=recipe.evaluate.train_pass_questions,
        device=recipe.run.device,
        dtype=recipe.model.dtype,
        seed=recipe.run.seed,
    )


def _dpo_fingerprint(recipe, *, rollout: Path, heldout: Path | None, model: Path, **_others) -> dict:
    return dpo_fingerprint(recipe.selfplay.dpo, rollout, heldout, model, recipe.run.seed)


def _not_measured(output_dir: Path, reason: str, *, turned_off: bool = False) -> dict:
    if not turned_off:
        log.warning("training pass@1 after DPO not measured: %s", reason)
    stats = {"status": "not measured", "reason": reason}
    (output_dir / TRAIN_PASS_STATS).write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    return stats


DPO = Stage(
    name="dpo",
    folder="dpo",
    section="selfplay.dpo",
    run=_dpo,
    inputs={
        "rollout": Input(PAIRS),
        # Held-out pairs drive early stopping and the reward accuracy; by default those beside the pairs.
        "heldout": Input(HELDOUT_PAIRS, beside="rollout", optional=True),
        # The rollout's samples, for pass@1 before DPO on the same questions: by default beside the pairs too.
        "rollouts": Input(ROLLOUTS, beside="rollout", optional=True),
        "model": MODEL,
        # The questions' text for pass@1 after DPO: the run's data stage, when there is one.
        "data": Input(TRAIN_FILE, default_stage="prepare_data", optional=True),
        # For the rounds file: the rollout's statistics beside the pairs, and the previous round's list (that
        # round's DPO folder; none for the first round, whose model is not a DPO round's).
        "rollout_stats": Input(STATS, beside="rollout", optional=True),
        "previous_rounds": Input(ROUNDS_FILE, optional=True),
    },
    outputs=(
        CHECKPOINTS,
        "model",
        "adapter",
        DPO_METRICS,
        "dpo_loss.png",
        "dpo_heldout.png",
        FINGERPRINT_FILE,
        MANIFEST_NAME,
        TRAIN_PASS,
        TRAIN_PASS_STATS,
        ROUNDS_FILE,
    ),
    stats=DPO_METRICS,
    fingerprint=FINGERPRINT_FILE,  # settings, seed, pairs checksums, starting weights
    options=("restart", OUTPUT_URI),  # output_uri: an s3:// one keeps the checkpoints there too
    produces="model",
    unchanged_model="model",  # no pairs: the round keeps its model
    local_only=(CHECKPOINTS,),
    # adapter/: LoRA only; dpo_heldout.png: with held-out pairs; train_pass.jsonl: when it was measured
    optional=("adapter", "dpo_loss.png", "dpo_heldout.png", TRAIN_PASS),
    expected_fingerprint=_dpo_fingerprint,  # a run skipped for want of pairs records none: it runs again
    extra_stats={"train_pass": TRAIN_PASS_STATS},
)
