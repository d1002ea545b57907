"""Settings shared by a vLLM check script and the pytest test that runs the same work on transformers,
so both backends see the same questions, prompts, seeds and lengths. Imported by the scripts (their
folder is on sys.path) and by the tests (as tests.vllm_scripts.checks_common)."""

from __future__ import annotations

SAMPLING = dict(n=3, temperature=1.0, top_p=0.95, max_new_tokens=16)
CUT_LENGTHS = range(1, 9)  # greedy generations stopped by max_new_tokens at each of these lengths
CHAIN_TEXT = "x龘㐀"  # the chain model's greedy reply: six tokens, three of the cuts fall inside a character
# Scored after the MCQ prompt: letters, a set of letters, and the trained format with an empty think block.
CONTINUATIONS = ["答案：A", "答案：B", "答案：AB", "<think>\n\n</think>\n\n答案：C"]


def questions():
    from medcritical.data.bundled import bundled_questions

    return bundled_questions()[:8]


def rollout_config():
    from medcritical.selfplay.config import RolloutSection

    return RolloutSection(samples_per_question=2, temperature=1.0, max_new_tokens=32, chunk_size=5)


def correction_config():
    from medcritical.selfplay.config import CorrectionSection

    return CorrectionSection(attempts=2, temperature=1.0)


def evaluation_configs(backend: str) -> dict:
    from medcritical.evaluation.config import EvaluateSection
    from medcritical.modeling.config import GenerationSection

    generation = GenerationSection(backend=backend, max_new_tokens=24, batch_size=8)
    return {"generate": (EvaluateSection(), generation), "loglik": (EvaluateSection(scoring="loglik"), generation)}


def distill_config(backend: str, model: str):
    from medcritical.distill.config import DistillSection, LocalTeacher

    return DistillSection(
        backend=backend,
        teacher_model=model,
        attempts=2,
        temperature=0.7,
        max_new_tokens=32,
        template_max_new_tokens=16,
        local=LocalTeacher(batch_size=4, dtype="float32"),
    )
