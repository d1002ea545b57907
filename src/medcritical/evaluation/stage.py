"""The evaluation stage's declaration (see medcritical.core.stage): CMExam evaluation questions and a model in,
a labelled report out."""

from __future__ import annotations

from pathlib import Path

from medcritical.core.stage import MODEL, Input, Stage
from medcritical.data.cmexam import load_questions
from medcritical.data.prepare import EVAL_FILE
from medcritical.evaluation.evaluate import OUTPUTS_JSONL, evaluate_model, evaluation_fingerprint
from medcritical.evaluation.judge import JUDGEMENTS_JSONL
from medcritical.evaluation.report import GRADED_JSONL, PLOT_PNG, REPORT_JSON, REPORT_MD
from medcritical.io.fingerprint import FINGERPRINT_FILE


def _run(recipe, output_dir: Path, *, data: Path, model: Path, label: str = "", restart: bool = False) -> dict:
    return evaluate_model(
        recipe.evaluate,
        recipe.generation,
        load_questions(data, recipe.data.on_bad_row).questions,
        model,
        output_dir,
        device=recipe.run.device,
        dtype=recipe.model.dtype,
        label=label or None,
        restart=restart,
    )


def _expected_fingerprint(recipe, *, data: Path, model: Path, label: str = "", **_options) -> dict | None:
    """The fingerprint `evaluate_model` records for these questions (the first `limit` of them) and model. None
    with a label: the label is written into the report but not into the fingerprint, so the run goes ahead."""
    if label:
        return None
    questions = load_questions(data, recipe.data.on_bad_row).questions
    limit = recipe.evaluate.limit
    return evaluation_fingerprint(
        recipe.evaluate,
        recipe.generation,
        list(questions)[:limit] if limit else list(questions),
        model,
        device=recipe.run.device,
        dtype=recipe.model.dtype,
    )


EVALUATE = Stage(
    name="evaluate",
    folder="eval",
    section="evaluate",
    run=_run,
    inputs={"data": Input(EVAL_FILE, default_stage="prepare_data"), "model": MODEL},
    outputs=(FINGERPRINT_FILE, OUTPUTS_JSONL, JUDGEMENTS_JSONL, GRADED_JSONL, REPORT_JSON, REPORT_MD, PLOT_PNG),
    stats=REPORT_JSON,
    fingerprint=FINGERPRINT_FILE,
    produces="metrics",
    options=("label", "restart"),
    optional=(JUDGEMENTS_JSONL, PLOT_PNG),  # judgements: the judged protocols only
    expected_fingerprint=_expected_fingerprint,
)
