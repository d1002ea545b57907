"""Recipe section `distill`: how the teacher writes thought templates and long chains of thought."""

from __future__ import annotations

from typing import Literal

from medcritical.section import Section


class OpenAITeacher(Section):
    base_url: str | None = None  # e.g. http://qwq:8000/v1; env MEDCRITICAL_TEACHER_BASE_URL
    model: str | None = None  # env MEDCRITICAL_TEACHER_MODEL
    api_key_env: str = "MEDCRITICAL_TEACHER_API_KEY"  # the key is read from this variable, never the recipe
    concurrency: int = 8
    timeout_s: float = 600.0
    max_retries: int = 6


class DistillConfig(Section):
    # openai: an OpenAI-compatible endpoint; transformers / vllm: a local model (teacher_model);
    # explanations: traces built offline from CMExam's own expert explanations (free; the demo uses it).
    backend: Literal["openai", "transformers", "vllm", "explanations"] = "explanations"
    openai: OpenAITeacher = OpenAITeacher()
    teacher_model: str | None = None  # local folder for the transformers / vllm backends
    language: Literal["zh", "en"] = "zh"
    attempts: int = 2  # tries per question until a trace matches gold
    verify: bool = True  # keep only traces whose final answer matches gold
    show_gold_answer: bool = False  # the paper's code showed it; off keeps the teacher honest
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 4096
    price_per_million_tokens: float | None = None  # for the cost estimate in the statistics
