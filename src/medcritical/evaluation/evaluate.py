"""The evaluation step: CMExam accuracy under one named protocol, never mixed.

- ``mcq``: the question with its options; the answer letters are read by the one grader
  (`medcritical.grader`) from generated text, or, with ``scoring: loglik``, taken as the most likely
  complete answer among every non-empty set of options, written in the trained format
  (`loglik_rows`); the gold answer plays no part in how a question is scored.
- ``judge-paper`` / ``judge-rubric``: the question without options; a judge model behind an
  OpenAI-compatible endpoint grades the free answer (`medcritical.evaluation.judge` says how each does).

Generated outputs are appended to ``outputs.jsonl`` chunk by chunk, so an interrupted evaluation
resumes where it stopped; grading is recomputed from them (cheap) on every run. A rerun resumes
only outputs made from the same questions, prompt, settings and model weights (``fingerprint.json``);
anything else is an error naming what changed, or, with ``restart``, starts over.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from medcritical.analysis.diagnostics import format_diagnostics, hit_token_limit, row_status
from medcritical.data.cmexam import Question, load_questions
from medcritical.errors import InputError, StepError
from medcritical.evaluation import judge as judging
from medcritical.evaluation.config import EvaluateSection
from medcritical.evaluation.metrics import summarize
from medcritical.evaluation.report import dropped_note, write_report
from medcritical.grader import grade_answer
from medcritical.io.fingerprint import check_resume, model_fingerprint, questions_fingerprint
from medcritical.io.jsonl import append_jsonl, read_input_jsonl, read_jsonl
from medcritical.modeling import generation
from medcritical.modeling.config import GenerationSection
from medcritical.modeling.generation import generation_setup, generator_for
from medcritical.prompts import load_prompt, mcq_messages

log = logging.getLogger(__name__)

OUTPUTS_JSONL = "outputs.jsonl"
RESUMED_OUTPUTS = (OUTPUTS_JSONL, "judgements.jsonl")  # what a rerun continues; the fingerprint vouches for them
CHUNK = 256  # questions generated between two appends to outputs.jsonl


class UnusableVerdicts(InputError):
    """Too many judge replies without a usable verdict: the evaluation is not a result. The user's to fix
    (the judge endpoint's settings), so one sentence and exit 2; an InputError is a ValueError too."""


def _first_unusable(graded: list[dict]) -> str:
    return next((row.get("judge_reply", "") for row in graded if row.get("dropped")), "")[:80]


def grade_mcq(questions: Sequence[Question], outputs: dict[str, dict], max_new_tokens: int | None = None) -> list[dict]:
    """One graded row per question from its output row (``output``, optional ``num_tokens``); a
    question without output gets predicted "" and counts wrong."""
    rows = []
    for q in questions:
        output = outputs.get(q.id)
        grade = grade_answer(output["output"] if output else "", q.answer, q.options)
        limit = hit_token_limit(output.get("num_tokens") if output else None, max_new_tokens)
        rows.append(
            {
                "id": q.id,
                "predicted": grade.predicted,
                "correct": grade.correct,
                "gold": q.answer,
                "status": row_status(grade.status, grade.predicted, limit),
                "rule": grade.rule,
                "multi_answer": q.is_multi_answer,
                "has_output": output is not None,
                "hit_token_limit": limit,
            }
        )
    return rows


def _report(protocol: str, questions, graded: list[dict], **fields) -> dict:
    report = summarize(protocol, questions, {row["id"]: row["correct"] for row in graded})
    report.update(fields)
    report["missing_predictions"] = [row["id"] for row in graded if not row["has_output"]]
    if protocol == "mcq":
        report["format"] = format_diagnostics(graded)
    return report


def score_predictions(dataset: str | Path, predictions: str | Path, output_dir: str | Path) -> dict:
    """Score saved outputs (`{"id", "output"}` JSONL rows) with the mcq protocol; no model needed."""
    questions = load_questions(dataset).questions
    known = {q.id for q in questions}
    outputs = read_predictions(predictions)
    if not known & outputs.keys():
        raise InputError(
            f"--predictions {predictions}: none of its {len(outputs)} ids is a question of {dataset} (e.g. "
            f"{next(iter(outputs))!r} vs {questions[0].id!r}); are these the predictions for this dataset?"
        )
    unknown = sorted(set(outputs) - known)
    if unknown:
        log.warning("%d predictions have ids not in %s (ignored), e.g. %s", len(unknown), dataset, unknown[:5])
    graded = grade_mcq(questions, {i: {"output": text} for i, text in outputs.items()})
    report = _report(
        "mcq",
        questions,
        graded,
        scoring="saved predictions",
        dataset=str(dataset),
        model=f"predictions: {predictions}",
        unknown_ids=unknown,
    )
    missing = report["missing_predictions"]
    if missing:
        log.warning("%d dataset questions have no prediction (counted wrong), e.g. %s", len(missing), missing[:5])
    write_report(report, graded, output_dir)
    return report


def read_predictions(path: str | Path) -> dict[str, str]:
    """Saved outputs by question id: JSONL rows {"id": ..., "output": "text"}, ids unique, outputs text."""
    outputs: dict[str, str] = {}
    lines: dict[str, int] = {}
    where = f"--predictions {path}"
    for number, row in read_input_jsonl(path, "--predictions"):
        line = f"{where}: line {number}"
        if "id" not in row or "output" not in row:
            raise InputError(
                f'{line}: no {"id" if "id" not in row else "output"!r} key; each row is {{"id": ..., "output": "text"}}'
            )
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise InputError(f"{line}: the id {row['id']!r} is not a string or integer")
        if not isinstance(row["output"], str):
            raise InputError(
                f"{line}: the output is a {type(row['output']).__name__}, not text; write the model's answer as a string"
            )
        key = str(row["id"])
        if key in lines:
            raise InputError(
                f"{line}: duplicate id {key!r} (first at line {lines[key]}); keep one prediction per question"
            )
        lines[key] = number
        outputs[key] = row["output"]
    if not outputs:
        raise InputError(f"{where}: no predictions (the file is empty); give one row per question")
    return outputs


def _load_outputs(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in read_jsonl(path)}


def _generate_missing(
    questions: Sequence[Question],
    output_file: Path,
    make_rows: Callable[[list[Question]], list[dict]],
) -> dict[str, dict]:
    """Run `make_rows` on the questions not yet in `output_file`, appending each chunk as it finishes."""
    done = _load_outputs(output_file)
    todo = [q for q in questions if q.id not in done]
    if done:
        log.info("resuming: %d outputs already in %s, %d to go", len(done), output_file, len(todo))
    output_file.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), CHUNK):
        rows = make_rows(todo[start : start + CHUNK])
        append_jsonl(rows, output_file)
        done.update((row["id"], row) for row in rows)
        log.info("evaluated %d/%d questions", len(done), len(questions))
    return done


def answer_candidates(options: Sequence[str], kind: str = "subsets") -> list[str]:
    """Every answer the loglik scoring weighs: each non-empty set of option letters, letters sorted
    as the SFT traces write them ("subsets": 2^k - 1), or each single letter ("single")."""
    letters = sorted(options)
    if kind == "single":
        return letters
    return sorted(
        ("".join(c for i, c in enumerate(letters) if mask >> i & 1) for mask in range(1, 1 << len(letters))),
        key=lambda s: (len(s), s),
    )


def check_loglik_backend(backend: str) -> None:
    """Fail before any work when the generation backend cannot score continuations."""

    cls = {"transformers": "TransformersGenerator", "vllm": "VLLMGenerator"}.get(backend)
    if not hasattr(getattr(generation, cls or "", None), "continuation_logprobs"):
        raise InputError(
            f"evaluate.scoring 'loglik' needs continuation log-probabilities, which the {backend!r} generation "
            "backend does not offer here; use generation.backend: transformers or evaluate.scoring: generate"
        )


def end_of_turn(generator) -> str:
    """The token text that closes the model's reply (its EOS, e.g. <|im_end|> for Qwen chat models):
    scored after the letters so that "A" cannot win just by being a prefix of "AB"."""
    tokenizer = getattr(generator, "tokenizer", None)
    if tokenizer is None and hasattr(generator, "llm"):  # vLLM
        tokenizer = generator.llm.get_tokenizer()
    if tokenizer is None or not tokenizer.eos_token:
        raise InputError("loglik scoring needs the model's end-of-sequence token; its tokenizer defines none")
    return tokenizer.eos_token


def loglik_rows(generator, questions: Sequence[Question], config: EvaluateSection) -> list[dict]:
    """The most likely complete answer of each question among `answer_candidates`, by the summed
    log-probability of ``loglik_prefix + letters + end of turn`` as the model's reply.

    Not length-normalized: each candidate is a whole reply ending with the end-of-turn token, so its
    summed log-probability is the probability of writing exactly that reply; a per-token average
    would favour long letter sets and depends on how the tokenizer merges letters ("AB" may be one
    token). The gold answer is never read."""
    candidates = [answer_candidates(q.options, config.loglik_answers) for q in questions]
    end = end_of_turn(generator)
    scores = generator.continuation_logprobs(
        [mcq_messages(q, config.language) for q in questions],
        [[config.loglik_prefix + answer + end for answer in answers] for answers in candidates],
    )
    rows = []
    for q, answers, answer_scores in zip(questions, candidates, scores):
        best = max(range(len(answers)), key=answer_scores.__getitem__)
        rows.append(
            {
                "id": q.id,
                "output": config.loglik_prefix + answers[best],
                "loglik": {a: round(s, 4) for a, s in zip(answers, answer_scores)},
                "num_tokens": 0,
            }
        )
    return rows


# The prompt files each protocol's outputs and verdicts depend on: the student's, then the judge's.
PROTOCOL_PROMPTS = {
    "mcq": ("mcq",),
    "judge-paper": ("student_paper", "judge_paper"),
    "judge-rubric": ("open", "judge_rubric"),
}


def evaluation_fingerprint(
    config: EvaluateSection,
    generation: GenerationSection,
    questions: Sequence[Question],
    model_path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """What the saved outputs depend on: the questions' content, every prompt file the protocol uses
    (student and judge), the protocol settings with the judge model as resolved (a recipe may leave it to
    MEDCRITICAL_JUDGE_MODEL), the backend and dtype the student samples with, and the model's weights.
    A rerun resumes only when all of them match."""
    # Keys that change how the work is done, not what it produces, stay out.
    settings = config.model_dump(mode="json", exclude={"limit", "train_pass_questions"})
    for key in ("base_url", "api_key_env", "concurrency", "timeout_s", "max_retries", "max_failed_requests"):
        settings.get("judge", {}).pop(key, None)
    if config.protocol != "mcq":
        settings["judge"]["model"] = config.judge.model or os.environ.get(f"{judging.JUDGE_ENV_PREFIX}_MODEL")
    return {
        "questions": questions_fingerprint(questions),
        "prompts": [load_prompt(name, config.language).version for name in PROTOCOL_PROMPTS[config.protocol]],
        "evaluate": settings,
        "generation": {
            **generation_setup(generation.backend, device, dtype),
            "max_new_tokens": generation.max_new_tokens,
        },
        "model": model_fingerprint(model_path),
    }


def _student_rows(chunk: list[Question], completions) -> list[dict]:
    return [{"id": q.id, "output": c[0].text, "num_tokens": c[0].num_tokens} for q, c in zip(chunk, completions)]


def _evaluate_mcq(
    config: EvaluateSection,
    generation: GenerationSection,
    questions: list[Question],
    model_path: str | Path,
    output_dir: Path,
    *,
    generator,
    device: str,
    dtype: str,
    fields: dict,
) -> tuple[dict, list[dict]]:
    """The ``mcq`` protocol: generate (or score by likelihood) the missing outputs and grade them; (report, graded)."""
    with generator_for(generator, model_path, generation, device=device, dtype=dtype) as generator:

        def mcq_rows(chunk: list[Question]) -> list[dict]:
            if config.scoring != "generate":
                return loglik_rows(generator, chunk, config)
            completions = generator.generate(
                [mcq_messages(q, config.language) for q in chunk],
                temperature=0.0,
                max_new_tokens=generation.max_new_tokens,
                desc=f"evaluating ({config.protocol})",
            )
            return _student_rows(chunk, completions)

        outputs = _generate_missing(questions, output_dir / OUTPUTS_JSONL, mcq_rows)
    graded = grade_mcq(questions, outputs, generation.max_new_tokens)
    for row in graded:
        row["output"] = outputs[row["id"]]["output"]
    return _report("mcq", questions, graded, scoring=config.scoring, **fields), graded


def _evaluate_with_judge(
    config: EvaluateSection,
    generation: GenerationSection,
    questions: list[Question],
    model_path: str | Path,
    output_dir: Path,
    *,
    generator,
    judge,
    device: str,
    dtype: str,
    fields: dict,
) -> tuple[dict, list[dict]]:
    """A judge protocol: generate the missing free answers, have the judge grade them; (report, graded)."""
    protocol, language = config.protocol, config.language
    judge = judge or judging.judge_from_config(config.judge, protocol, language, output_dir)  # probes it
    sampling = judging.student_sampling(protocol, generation.max_new_tokens)
    with generator_for(generator, model_path, generation, device=device, dtype=dtype) as generator:

        def student_rows(chunk: list[Question]) -> list[dict]:
            prompts = judging.student_prompts(protocol, chunk, language, config.judge.student_chat_template)
            return _student_rows(chunk, generator.generate(prompts, desc=f"evaluating ({protocol})", **sampling))

        outputs = _generate_missing(questions, output_dir / OUTPUTS_JSONL, student_rows)
    graded = judging.grade_with_judge(protocol, questions, outputs, judge)
    # Judge errors are dropped from the denominator (as the paper does) and counted beside it.
    judged = [row for row in graded if row["verdict"] is not None]
    if graded and not judged:  # not an accuracy of 0 of 0: the judge is not doing its job
        raise StepError(
            f"the judge ({config.judge.model}) gave no verdict for any of {len(graded)} questions (first: "
            f"{graded[0].get('error') or 'no verdict'}); its replies are in {Path(output_dir) / judging.JUDGEMENTS_JSONL}: "
            "check evaluate.judge (model, verdict_constraint, max_tokens), then rerun with --restart"
        )
    judged_ids = {row["id"] for row in judged}
    report = _report(
        protocol,
        [q for q in questions if q.id in judged_ids],
        judged,
        scoring=f"judge: {config.judge.model}",
        **fields,
    )
    dropped = len(graded) - len(judged)
    report |= {
        "questions": len(questions),
        "dropped": dropped,
        "student_sampling": sampling,
        "dropped_ids": [row["id"] for row in graded if row["verdict"] is None],
        # What the accuracy would be if every dropped verdict had been wrong, or right.
        "bounds": {
            "drops_as_wrong": report["correct"] / len(questions) if questions else 0.0,
            "drops_as_right": (report["correct"] + dropped) / len(questions) if questions else 0.0,
        },
    }
    return report, graded


def _check_usable_verdicts(config: EvaluateSection, report: dict, graded: list[dict], output_dir: Path) -> None:
    """A judge protocol whose unusable verdicts exceed `max_unusable_share` is no result (after the report is written)."""
    if config.protocol != "mcq" and report["dropped"] > config.judge.max_unusable_share * report["questions"]:
        raise UnusableVerdicts(
            f"evaluate ({config.protocol}): {report['dropped']} of {report['questions']} judge verdicts are unusable "
            f"(more than evaluate.judge.max_unusable_share={config.judge.max_unusable_share:g}); the accuracy over "
            f"the {report['n']} that parsed is not a result (first reply: {_first_unusable(graded)!r}). Check the "
            f"judge endpoint honours evaluate.judge.verdict_constraint ({config.judge.verdict_constraint}), or set "
            "extra_body's logit_bias; the report in "
            f"{output_dir} shows the bounds"
        )


def evaluate_model(
    config: EvaluateSection,
    generation: GenerationSection,
    questions: Sequence[Question],
    model_path: str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    label: str | None = None,
    generator=None,
    judge=None,
    restart: bool = False,
) -> dict:
    """Evaluate a model on `questions` under `config.protocol`; writes the report files, returns report.json.

    `generator` may be passed to reuse a model already in memory; `judge` to reuse a judge client.
    Outputs already in `output_dir` are resumed only when they were made from the same questions,
    prompt, settings and weights (`evaluation_fingerprint`); `restart` discards them instead.
    """

    output_dir = Path(output_dir)
    questions = list(questions)[: config.limit] if config.limit else list(questions)
    started = time.perf_counter()
    if config.protocol == "mcq" and config.scoring == "loglik":
        check_loglik_backend(generation.backend)
    # Before loading anything: a folder of another model's outputs is an error at once.
    check_resume(
        output_dir,
        evaluation_fingerprint(config, generation, questions, model_path, device=device, dtype=dtype),
        outputs=RESUMED_OUTPUTS,
        restart=restart,
    )
    fields = dict(
        model=str(model_path),
        dataset=f"{len(questions)} questions",
        label=label,
        language=config.language,
        max_new_tokens=generation.max_new_tokens,
        backend=generation.backend,
    )
    run = dict(generator=generator, device=device, dtype=dtype, fields=fields)
    if config.protocol == "mcq":
        report, graded = _evaluate_mcq(config, generation, questions, model_path, output_dir, **run)
    else:
        report, graded = _evaluate_with_judge(config, generation, questions, model_path, output_dir, judge=judge, **run)
    report["wall_s"] = round(time.perf_counter() - started, 2)
    write_report(report, graded, output_dir)
    _check_usable_verdicts(config, report, graded, output_dir)
    log.info(
        "CMExam accuracy (%s) of %s: %.1f%% (%d/%d%s) -> %s",
        report["protocol"],
        label or model_path,
        100 * report["accuracy"],
        report["correct"],
        report["n"],
        dropped_note(report),
        output_dir,
    )
    return report
