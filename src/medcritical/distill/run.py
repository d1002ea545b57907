"""The distillation step: per question, a thought template and up to N verified reasoning traces.

    stats = distill(recipe.distill, questions, "runs/demo/distill", seed=recipe.run.seed)

Writes to the output folder:
- ``fingerprint.json``: the setup the replies come from (teacher and its weights, sampling, language,
  prompts); a rerun with another setup is refused, `restart=True` discards the folder's outputs instead;
  once the outputs are written, also the questions, seed and acceptance settings (io/finished.py),
- ``distill_raw.jsonl``: the append-only progress log (every reply as it arrives; used to resume),
- ``sft.jsonl``: one chat-messages row per accepted question (user: the student's MCQ prompt,
  assistant: "<think>template + reasoning</think>\\n答案：X"), in input order,
- ``rejected.jsonl``: every unusable template and rejected trace, with its reason,
- ``distill_stats.json``: teacher, prompt versions, settings, counts, acceptance rates, tokens, cost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from medcritical.data.cmexam import Question
from medcritical.distill.config import DistillSection
from medcritical.distill.outputs import accepted_attempt, distill_statistics, question_outcome
from medcritical.distill.progress import SESSION, ProgressLog, QuestionProgress, replay, reply_event
from medcritical.distill.teachers import Teacher, TeacherRequest, build_teacher, served_teacher, teacher_identity
from medcritical.distill.traces import TEMPLATE, TRACE, DistillPrompts, template_messages, trace_messages
from medcritical.errors import InputError
from medcritical.io.fingerprint import check_resume, questions_fingerprint
from medcritical.io.finished import forget_finished, record_finished
from medcritical.io.jsonl import write_jsonl
from medcritical.modeling.llm_client import ChatReply, EndpointFailures

log = logging.getLogger(__name__)

RAW_FILE, SFT_FILE, REJECTED_FILE, STATS_FILE = "distill_raw.jsonl", "sft.jsonl", "rejected.jsonl", "distill_stats.json"
OUTPUTS = (RAW_FILE, SFT_FILE, REJECTED_FILE, STATS_FILE)  # what the setup fingerprint vouches for


# What the outputs depend on beyond the replies the progress log resumes: recorded once they are all written.
FINISHED_ONLY = ("questions", "seed", "outputs")


def distill(
    config: DistillSection,
    questions: Sequence[Question],
    output_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "auto",
    teacher: Teacher | None = None,
    restart: bool = False,
) -> dict:
    """Distill `questions` into `output_dir` (resuming what is there) and return the statistics.

    `teacher` replaces the one the config names (a custom backend); by default it is built from config.
    Replies already in `output_dir` are resumed only when they come from the same setup (`setup_fingerprint`);
    `restart` discards them instead of refusing. The whole fingerprint (`distill_fingerprint`) is recorded last.
    """
    output_dir = Path(output_dir)
    questions = distilled_questions(config, questions)
    if not questions:
        raise InputError("no questions to distill (empty input, or distill.limit is 0)")
    fingerprint = distill_fingerprint(config, questions, seed=seed, device=device, teacher=teacher)
    finished = {key: fingerprint.pop(key) for key in FINISHED_ONLY}
    forget_finished(output_dir, FINISHED_ONLY)  # unfinished until the outputs are written again
    # Before the teacher is built or served: replies of another teacher, prompt or language must not be mixed
    # in; per question, a changed question's replies are dropped by `replay` (each reply carries its hash).
    check_resume(output_dir, fingerprint, outputs=OUTPUTS, restart=restart)
    prompts = DistillPrompts.load(config.language)
    with _asked_teacher(config, prompts, output_dir, teacher, device) as (config, teacher):
        stats = _ask_and_write(config, prompts, questions, output_dir, teacher, seed)
    record_finished(output_dir, finished)
    return stats


def distilled_questions(config: DistillSection, questions: Sequence[Question]) -> list[Question]:
    """The questions a run distills: the first `distill.limit` of them."""
    return list(questions)[: config.limit] if config.limit is not None else list(questions)


def distill_fingerprint(
    config: DistillSection,
    questions: Sequence[Question],
    *,
    seed: int = 0,
    device: str = "auto",
    teacher: Teacher | None = None,
) -> dict:
    """What the outputs depend on, from the recipe alone (nothing built, loaded or served; a given `teacher`
    from its description): the setup the replies come from (`setup_fingerprint`), and beyond it
    (`FINISHED_ONLY`) the questions distilled, the seed, and the settings deciding what is asked and kept:
    verification, attempts, token budgets, an endpoint's extra request body and the price the cost is counted in."""
    identity = teacher.description if teacher is not None else teacher_identity(config, device=device)
    outputs = config.model_dump(
        mode="json",
        include={"verify", "attempts", "max_new_tokens", "template_max_new_tokens", "price_per_million_tokens"},
    )
    if config.backend in ("openai", "vllm-server"):
        outputs["extra_body"] = config.openai.extra_body
    return setup_fingerprint(config, DistillPrompts.load(config.language), identity) | {
        "questions": questions_fingerprint(questions),
        "seed": seed,
        "outputs": outputs,
    }


@contextlib.contextmanager
def _asked_teacher(config: DistillSection, prompts: DistillPrompts, output_dir: Path, teacher, device: str):
    """(the config as the teacher is asked, the teacher): the one given, else built from the config, a
    vllm-server's server started first; closed (a local model's engine and memory freed) and stopped on return."""
    if teacher is not None:
        yield config, teacher
        return
    with (
        served_teacher(config, output_dir) as served,  # the teacher's server lives as long as this call
        contextlib.closing(build_teacher(served, prompts, device=device)) as built,
    ):
        yield served, built


def _ask_and_write(
    config: DistillSection, prompts: DistillPrompts, questions: list[Question], output_dir: Path, teacher, seed: int
) -> dict:
    """Ask what is missing, then write the outputs and statistics; an outage or a teacher refusing everything
    raises after they are written (never a result: the rerun asks exactly the failed requests)."""
    progress_log = ProgressLog(output_dir / RAW_FILE)
    progress = replay(progress_log.read(), questions)
    # A deterministic teacher would repeat its rejected reply word for word.
    attempts = 1 if teacher.deterministic else config.attempts
    run = _Run(config, prompts, teacher, progress_log, progress, attempts, seed)
    finished_before = sum(run.finished(q) for q in questions)
    if finished_before:
        log.info("resuming: %d of %d questions already finished in %s", finished_before, len(questions), output_dir)
    started_at = datetime.now(UTC).isoformat()
    started, status = time.monotonic(), "interrupted"
    try:
        if finished_before < len(questions) and hasattr(teacher, "probe"):
            teacher.probe()  # a dead endpoint or a refused key stops here, before any work
        run.ask_until_done(questions, finished_before)
        status = "finished" if not run.failed else "endpoint failures"
    finally:
        progress_log.append(
            {
                "event": SESSION,
                "status": status,
                "started": started_at,
                "wall_time_s": round(time.monotonic() - started, 3),
            }
        )

    stats = _write_outputs(config, questions, run, output_dir, prompts, teacher, attempts)
    stats["resumed_questions"] = finished_before
    stats["unfinished_questions"] = sorted(run.failed)  # asked again by a rerun
    stats["session_wall_time_s"] = round(time.monotonic() - started, 3)
    _write_json(output_dir / STATS_FILE, stats)
    log.info(
        "distill: %d of %d questions accepted (%.1f%%) after %d trace attempts; %d tokens; %.1f s. SFT set: %s",
        stats["accepted"],
        stats["questions"],
        100 * stats["acceptance_rate"],
        stats["trace_attempts"],
        stats["tokens"]["total"],
        stats["wall_time_s"],
        output_dir / SFT_FILE,
    )
    if not stats["accepted"]:
        log.warning("no trace was accepted: the SFT set is empty; see %s for the reasons", output_dir / REJECTED_FILE)
    if hasattr(teacher, "raise_if_failed"):  # an outage, or a teacher refusing everything, is never a result
        teacher.raise_if_failed()
    if run.failed:
        # An outage is never a result: end non-zero; the rerun asks exactly the failed requests.
        raise EndpointFailures(
            f"distill: requests for {len(run.failed)} questions failed at the teacher; rerun the same command to continue"
        )
    return stats


def setup_fingerprint(config: DistillSection, prompts: DistillPrompts, teacher: Teacher | dict) -> dict:
    """What the replies depend on, beyond the question itself: the teacher (a built one's description, or the
    same from the recipe: `teachers.teacher_identity`; a local teacher's weights hash, not its folder name, and
    the dtype it samples in), its sampling, the language, the prompt versions and the gold-answer hint."""
    teacher = teacher if isinstance(teacher, dict) else teacher.description
    fingerprint = {
        "teacher": teacher.get("backend"),
        "model": teacher.get("model"),
        "weights": teacher.get("weights"),
        "sampling": {"temperature": config.temperature, "top_p": config.top_p},
        "language": config.language,
        "prompts": prompts.versions,
        "show_gold_answer": config.show_gold_answer,
    }
    if teacher.get("dtype"):  # local teachers only: an endpoint's runs keep their fingerprint
        fingerprint["dtype"] = teacher["dtype"]
    return fingerprint


class _Run:
    """The ask-grade-retry loop over the questions' progress."""

    def __init__(self, config, prompts, teacher, progress_log, progress, attempts, seed):
        self.config, self.prompts, self.teacher = config, prompts, teacher
        self.progress_log: ProgressLog = progress_log
        self.progress: dict[str, QuestionProgress] = progress
        self.attempts, self.seed = attempts, seed
        # Questions whose request the endpoint failed this session: not an attempt, not asked again
        # until a rerun (the same attempt, with the same seed).
        self.failed: set[str] = set()

    def finished(self, question: Question) -> bool:
        done = self.progress[question.id]
        if accepted_attempt(question, done, self.config.verify) is not None:
            return True
        if done.template is None:
            return len(done.templates) >= self.attempts
        return len(done.traces) >= self.attempts

    def next_request(self, question: Question) -> TeacherRequest | None:
        if self.finished(question) or question.id in self.failed:
            return None
        done = self.progress[question.id]
        if done.template is None:
            return TeacherRequest(
                question, TEMPLATE, max(done.templates, default=0) + 1, template_messages(self.prompts, question)
            )
        messages = trace_messages(self.prompts, question, done.template[1], self.config.show_gold_answer)
        return TeacherRequest(question, TRACE, max(done.traces, default=0) + 1, messages)

    def ask_until_done(self, questions: list[Question], finished_before: int) -> None:
        """Rounds of requests (templates first, then traces, then retries) until every question is finished."""
        with tqdm(total=len(questions), initial=finished_before, desc="distill", unit="question") as bar:

            def record(request: TeacherRequest, reply: ChatReply) -> None:
                if reply.endpoint_failed:
                    self.failed.add(request.question.id)
                    return
                self.progress_log.append(reply_event(request.question, request.kind, request.attempt, reply))
                self.progress[request.question.id].add(request.kind, request.attempt, reply)
                if self.finished(request.question):
                    bar.update(1)

            while requests := [r for q in questions if (r := self.next_request(q)) is not None]:
                groups: dict[tuple[str, int], list[TeacherRequest]] = {}
                for request in requests:
                    groups.setdefault((request.kind, request.attempt), []).append(request)
                for (kind, attempt), group in sorted(
                    groups.items(), key=lambda item: (item[0][0] != TEMPLATE, item[0][1])
                ):
                    log.info("asking the teacher for %d %ss (attempt %d)", len(group), kind, attempt)
                    self.teacher.complete(
                        group,
                        max_new_tokens=self.config.template_max_new_tokens
                        if kind == TEMPLATE
                        else self.config.max_new_tokens,
                        # Fixed per attempt, so a resumed run samples as an uninterrupted one would.
                        seed=self.seed + 1000 * attempt + (500 if kind == TEMPLATE else 0),
                        on_reply=record,
                    )


def _write_outputs(config, questions, run: _Run, output_dir: Path, prompts, teacher, attempts) -> dict:
    outcomes = [
        question_outcome(q, run.progress[q.id], prompts=prompts, verify=config.verify, source=teacher.description)
        for q in questions
    ]
    write_jsonl([o.sft_row for o in outcomes if o.sft_row is not None], output_dir / SFT_FILE)
    write_jsonl([row for o in outcomes for row in o.rejected], output_dir / REJECTED_FILE)
    sessions = [e for e in run.progress_log.read() if e.get("event") == SESSION]
    return {
        "teacher": teacher.description,
        "prompts": prompts.versions,
        "settings": {
            "language": config.language,
            "show_gold_answer": config.show_gold_answer,
            "verify": config.verify,
            "attempts_per_question": attempts,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "template_max_new_tokens": config.template_max_new_tokens,
            "seed": run.seed,
        },
        **distill_statistics(questions, outcomes, run.progress, config.price_per_million_tokens),
        "wall_time_s": round(sum(e.get("wall_time_s", 0.0) for e in sessions), 3),
        "sessions": len(sessions),
        "files": {"sft": SFT_FILE, "rejected": REJECTED_FILE, "progress_log": RAW_FILE},
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
