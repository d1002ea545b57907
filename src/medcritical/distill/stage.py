"""The distillation stage's declaration (see medcritical.core.stage): training questions in, verified traces out."""

from __future__ import annotations

from pathlib import Path

from medcritical.core.stage import Input, Stage
from medcritical.data.cmexam import load_questions
from medcritical.data.prepare import TRAIN_FILE
from medcritical.distill.run import (
    RAW_FILE,
    REJECTED_FILE,
    SFT_FILE,
    STATS_FILE,
    distill,
    distill_fingerprint,
    distilled_questions,
)
from medcritical.io.fingerprint import FINGERPRINT_FILE


def _run(recipe, output_dir: Path, *, data: Path, restart: bool = False) -> dict:
    questions = load_questions(data, recipe.data.on_bad_row).questions
    return distill(
        recipe.distill, questions, output_dir, seed=recipe.run.seed, device=recipe.run.device, restart=restart
    )


def _expected_fingerprint(recipe, *, data: Path, **_options) -> dict:
    """What `distill` records once its outputs are written, from the recipe and the questions: the teacher is
    neither built nor asked (a local teacher's weights are hashed)."""
    questions = distilled_questions(recipe.distill, load_questions(data, recipe.data.on_bad_row).questions)
    return distill_fingerprint(recipe.distill, questions, seed=recipe.run.seed, device=recipe.run.device)


DISTILL = Stage(
    name="distill",
    folder="distill",
    section="distill",
    run=_run,
    inputs={"data": Input(TRAIN_FILE, default_stage="prepare_data")},
    outputs=(FINGERPRINT_FILE, RAW_FILE, SFT_FILE, REJECTED_FILE, STATS_FILE),
    stats=STATS_FILE,
    # The teacher (and its weights), prompts, language and sampling; once the outputs are written, also the
    # questions, seed and the settings deciding what is kept (distill.run.distill_fingerprint).
    fingerprint=FINGERPRINT_FILE,
    recipe_files=("distill.teacher_model",),  # a local teacher given as s3://
    options=("restart",),
    expected_fingerprint=_expected_fingerprint,
)
