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
from medcritical.io.finished import forget_finished, record_finished

# What the report depends on beyond the outputs the evaluation resumes: recorded once the report is written.
FINISHED_ONLY = ("label",)


def _run(recipe, output_dir: Path, *, data: Path, model: Path, label: str = "", restart: bool = False) -> dict:
    forget_finished(output_dir, FINISHED_ONLY)  # unfinished until the report is written again
    report = evaluate_model(
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
    record_finished(output_dir, {"label": label or None})
    return report


def _expected_fingerprint(recipe, *, data: Path, model: Path, label: str = "", **_options) -> dict:
    """What `_run` records once the report is written: the fingerprint `evaluate_model` records for these
    questions (the first `limit` of them), settings and model, and the report's label."""
    questions = load_questions(data, recipe.data.on_bad_row).questions
    limit = recipe.evaluate.limit
    return evaluation_fingerprint(
        recipe.evaluate,
        recipe.generation,
        list(questions)[:limit] if limit else list(questions),
        model,
        device=recipe.run.device,
        dtype=recipe.model.dtype,
    ) | {"label": label or None}


EVALUATE = Stage(
    name="evaluate",
    folder="eval",
    section="evaluate",
    run=_run,
    inputs={"data": Input(EVAL_FILE, default_stage="prepare_data"), "model": MODEL},
    outputs=(FINGERPRINT_FILE, OUTPUTS_JSONL, JUDGEMENTS_JSONL, GRADED_JSONL, REPORT_JSON, REPORT_MD, PLOT_PNG),
    stats=REPORT_JSON,
    # What the outputs are made from (evaluation.evaluate.evaluation_fingerprint), and the label once the report is
    # written: the same evaluation under another label resumes its outputs and writes its report again.
    fingerprint=FINGERPRINT_FILE,
    produces="metrics",
    options=("label", "restart"),
    optional=(JUDGEMENTS_JSONL, PLOT_PNG),  # judgements: the judged protocols only
    expected_fingerprint=_expected_fingerprint,
)
