"""The distillation stage's declaration (see medcritical.core.stage): training questions in, verified traces out."""

from __future__ import annotations

from pathlib import Path

from medcritical.core.stage import Input, Stage
from medcritical.data.cmexam import load_questions
from medcritical.data.prepare import TRAIN_FILE
from medcritical.distill.run import RAW_FILE, REJECTED_FILE, SFT_FILE, STATS_FILE, distill
from medcritical.io.fingerprint import FINGERPRINT_FILE


def _run(recipe, output_dir: Path, *, data: Path, restart: bool = False) -> dict:
    questions = load_questions(data, recipe.data.on_bad_row).questions
    return distill(
        recipe.distill, questions, output_dir, seed=recipe.run.seed, device=recipe.run.device, restart=restart
    )


DISTILL = Stage(
    name="distill",
    folder="distill",
    section="distill",
    run=_run,
    inputs={"data": Input(TRAIN_FILE, default_stage="prepare_data")},
    outputs=(FINGERPRINT_FILE, RAW_FILE, SFT_FILE, REJECTED_FILE, STATS_FILE),
    stats=STATS_FILE,
    fingerprint=FINGERPRINT_FILE,  # the teacher (and its weights), prompts, language and sampling
    recipe_files=("distill.teacher_model",),  # a local teacher given as s3://
    options=("restart",),
)
