"""The `evaluate:` recipe section: the CMExam protocol and its judge."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medcritical.core.section import BaseUrl, EnvName, Section
from medcritical.modeling.config import MAX_TOKENS


class JudgeSection(Section):
    """The judge protocols (judge-paper, judge-rubric): a judge model behind an OpenAI-compatible endpoint."""

    base_url: BaseUrl = None  # e.g. http://judge:8000/v1; env MEDCRITICAL_JUDGE_BASE_URL
    model: str | None = None  # env MEDCRITICAL_JUDGE_MODEL
    api_key_env: EnvName = "MEDCRITICAL_JUDGE_API_KEY"  # the key is read from this variable, never the recipe
    concurrency: int = Field(8, ge=1, le=4096)
    timeout_s: float = Field(120.0, gt=0, le=86400)
    max_retries: int = Field(5, ge=0, le=100)  # the openai SDK's retries per request
    # Requests the judge endpoint may fail (after the retries) before the step stops early; any
    # failure ends the evaluation non-zero, and a rerun asks only the missing verdicts.
    max_failed_requests: int = Field(10, ge=0, le=10_000_000)
    # Sent with every judge request, e.g. {logit_bias: {"16": 100, "17": 100}} with the judge
    # tokenizer's ids of "1" and "2" for an endpoint without structured outputs.
    extra_body: dict = {}
    # judge-paper: how the one-token verdict is held to "1" or "2": structured_outputs (vLLM >= 0.11:
    # {"structured_outputs": {"choice": ["1", "2"]}}), guided_choice (older vLLM; newer ones ignore it
    # silently) or none (hosted APIs). The reply is parsed strictly either way.
    verdict_constraint: Literal["structured_outputs", "guided_choice", "none"] = "structured_outputs"
    # judge-paper: the student gets the raw question (no chat template), as in SP-Huatuo's evaluation;
    # true wraps it in the student's chat template.
    student_chat_template: bool = False
    max_tokens: int = Field(1024, ge=1, le=MAX_TOKENS)  # judge-rubric: room for reasons before the verdict line
    # Unusable verdicts (no 1/2, no verdict line) are dropped from the denominator; above this share of
    # the questions the evaluation fails: a server that ignores the verdict constraint must not turn a run
    # into "the accuracy over the rows that parsed". SP-Huatuo forces the token and has none.
    max_unusable_share: float = Field(0.01, ge=0.0, le=1.0)


class EvaluateSection(Section):
    # mcq: options shown, letters graded. judge-paper: SP-Huatuo's evaluation (no options, sampled
    # student, a judge answers 1 or 2). judge-rubric: no options, a judge with the reference and the
    # expert explanation ends with a strict verdict line. Numbers of different protocols never mix.
    protocol: Literal["mcq", "judge-paper", "judge-rubric"] = "mcq"
    # mcq only: "generate" (free text + the grader) or "loglik" (the most likely answer among the
    # candidates below, scored as the model's reply; no generation, never looks at the gold answer).
    scoring: Literal["generate", "loglik"] = "generate"
    # loglik: which answers are candidates. "subsets": every non-empty set of options (31 for five),
    # so multi-answer questions are scored like the others (CMExam does not say which ones are
    # multi-answer); "single": one letter each (5x cheaper; multi-answer questions then count wrong).
    loglik_answers: Literal["subsets", "single"] = "subsets"
    # loglik: the reply's opening before the letters, in the trained format (an empty reasoning block,
    # then the answer statement of the SFT traces). Each candidate is this + letters + end of turn.
    loglik_prefix: str = "<think>\n\n</think>\n答案："
    language: Literal["zh", "en"] = "zh"
    limit: int | None = Field(None, ge=1)  # evaluate only the first N questions (quick checks)
    judge: JudgeSection = JudgeSection()
    # After each DPO round, how many of the round's training questions (a seeded choice; null: all) the
    # DPO model answers again with the rollout's settings: pass@1 before -> after DPO and the paired
    # test in the run report. 0: off. Runs in the DPO step on the transformers backend (k samples each).
    train_pass_questions: int | None = Field(0, ge=0)

    @model_validator(mode="after")
    def _loglik_is_mcq(self) -> EvaluateSection:
        if self.scoring == "loglik" and self.protocol != "mcq":
            raise ValueError(
                f"evaluate.scoring 'loglik' scores the options of the mcq protocol, and protocol {self.protocol!r} "
                "shows none (the judge grades free answers); use scoring: generate, or protocol: mcq"
            )
        return self
