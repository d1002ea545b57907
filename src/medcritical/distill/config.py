"""Recipe section `distill`: how the teacher writes thought templates and long chains of thought."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medcritical.core.section import BaseUrl, EnvName, Section
from medcritical.modeling.config import MAX_GPUS, MAX_TEMPERATURE, MAX_TOKENS


class OpenAITeacher(Section):
    base_url: BaseUrl = None  # e.g. http://qwq:8000/v1; env MEDCRITICAL_TEACHER_BASE_URL
    model: str | None = None  # env MEDCRITICAL_TEACHER_MODEL
    api_key_env: EnvName = "MEDCRITICAL_TEACHER_API_KEY"  # the key is read from this variable, never the recipe
    concurrency: int = Field(8, ge=1, le=4096)  # requests in flight at once
    timeout_s: float = Field(600.0, gt=0, le=86400)
    # Retries per request (the openai SDK's: exponential backoff with jitter, Retry-After honoured).
    max_retries: int = Field(6, ge=0, le=100)
    # Requests the endpoint may fail (after the retries) before the step stops early; any failure ends
    # the step non-zero, and a rerun asks exactly the failed requests again.
    max_failed_requests: int = Field(10, ge=0, le=10_000_000)
    # Sent with every request, e.g. {chat_template_kwargs: {enable_thinking: true}} for vLLM/SGLang.
    extra_body: dict = {}


class LocalTeacher(Section):
    """The transformers / vllm backends: a local teacher model (distill.teacher_model)."""

    # transformers: prompts per forward pass. vllm: prompts per call (use hundreds). Results are
    # appended to the progress log after each batch.
    batch_size: int = Field(16, ge=1, le=65536)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_GPUS)  # vllm only
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vllm only


class TeacherServer(Section):
    """The vllm-server backend: a vLLM OpenAI server over distill.teacher_model, started inside the step
    (requests then go through the openai backend's client with the distill.openai settings)."""

    tensor_parallel_size: int | None = Field(None, ge=1, le=MAX_GPUS)  # null: every GPU the step was given
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=1, le=MAX_TOKENS)  # null: the model's own; lower it to fit the KV cache
    # Passed to `vllm.entrypoints.openai.api_server` as they are, e.g. [--reasoning-parser, deepseek_r1].
    extra_args: list[str] = []
    start_timeout_s: float = Field(1800.0, gt=0, le=86400)  # loading a 32B model takes minutes
    log_file: str = "teacher-server.log"  # in the step's output folder


class DistillSection(Section):
    # openai: an OpenAI-compatible endpoint; transformers / vllm: a local model (teacher_model);
    # explanations: traces built offline from CMExam's own expert explanations (free; the demo uses it).
    # vllm-server: a vLLM OpenAI server over teacher_model started inside the step (`server`), asked
    # through the openai client: no endpoint to deploy, the same concurrency and replies as openai.
    backend: Literal["openai", "transformers", "vllm", "vllm-server", "explanations"] = "explanations"
    openai: OpenAITeacher = OpenAITeacher()
    server: TeacherServer = TeacherServer()
    teacher_model: str | None = None  # local folder (or "tiny") for the transformers / vllm backends
    local: LocalTeacher = LocalTeacher()
    language: Literal["zh", "en"] = "zh"
    attempts: int = Field(2, ge=1, le=100)  # tries per question until a trace matches gold
    verify: bool = True  # keep only traces whose final answer matches gold
    show_gold_answer: bool = False  # the paper's code showed it; off keeps the teacher honest
    temperature: float = Field(0.7, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(4096, ge=1, le=MAX_TOKENS)
    # Reasoning teachers think before writing the template too; raise this if templates come back truncated.
    template_max_new_tokens: int = Field(2048, ge=1, le=MAX_TOKENS)
    # explanations backend: keep only the first N characters of each expert explanation (short traces a
    # tiny CPU model can learn in minutes, as in the demo); null keeps the whole explanation.
    explanation_max_chars: int | None = Field(None, ge=1)
    limit: int | None = Field(None, ge=1)  # distill only the first N questions (quick checks, cost control)
    price_per_million_tokens: float | None = Field(
        None, ge=0, le=1_000_000
    )  # prompt + completion tokens; for the cost estimate
