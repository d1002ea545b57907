"""The `evaluate:` recipe section: the CMExam protocol and its judge."""

from __future__ import annotations

from typing import Literal

from medcritical.section import Section


class JudgeConfig(Section):
    """The paper's open-ended protocol: a judge model behind an OpenAI-compatible endpoint."""

    base_url: str | None = None  # e.g. http://judge:8000/v1; env MEDCRITICAL_JUDGE_BASE_URL
    model: str | None = None  # env MEDCRITICAL_JUDGE_MODEL
    api_key_env: str = "MEDCRITICAL_JUDGE_API_KEY"  # the key is read from this variable, never the recipe
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    max_tokens: int = 512  # room for a reasoning judge; the verdict is its last 正确/错误 (correct/incorrect)


class EvaluateConfig(Section):
    # mcq: options shown, letters graded. judge: no options, a judge grades the free answer.
    protocol: Literal["mcq", "judge"] = "mcq"
    # mcq only: "generate" (free text + the grader) or "loglik" (likelihood of each option letter;
    # single-answer questions only, multi-answer ones are still generated).
    scoring: Literal["generate", "loglik"] = "generate"
    language: Literal["zh", "en"] = "zh"
    limit: int | None = None  # evaluate only the first N questions (quick checks)
    judge: JudgeConfig = JudgeConfig()
