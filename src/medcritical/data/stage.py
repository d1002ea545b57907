"""The data stage's declaration (see medcritical.core.stage): CMExam in, the train and evaluation splits out."""

from __future__ import annotations

from pathlib import Path

from medcritical.core.stage import Stage
from medcritical.data.prepare import EVAL_FILE, STATS_FILE, TRAIN_FILE, prepare_data


def _run(recipe, output_dir: Path) -> dict:
    return prepare_data(recipe.data, recipe.run.seed, output_dir)


PREPARE_DATA = Stage(
    name="prepare_data",
    folder="data",
    section="data",
    run=_run,
    inputs={},
    outputs=(TRAIN_FILE, EVAL_FILE, STATS_FILE),
    stats=STATS_FILE,
    fingerprint=None,  # a pure function of the recipe's data section: rebuilt in seconds every run
    recipe_files=("data.source", "data.eval_source"),
)
