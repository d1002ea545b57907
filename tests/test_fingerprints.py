"""Issue 24, item 7: the resume fingerprints cover every input the saved work depends on.

Holes closed: the judge protocols' prompt files (student and judge), verdicts resumed by id only, a judge
or teacher model named by an environment variable recorded as None, the backend and dtype the samples
were drawn with, and a LoRA adapter folder fingerprinted without its base model."""

import json
import shutil

import pytest

from medcritical.distill.config import DistillSection, OpenAITeacher
from medcritical.evaluation.config import EvaluateSection, JudgeSection
from medcritical.evaluation.evaluate import evaluation_fingerprint
from medcritical.evaluation.judge import JUDGEMENTS_JSONL, judge_from_config
from medcritical.io.fingerprint import model_fingerprint
from medcritical.modeling.config import GenerationSection
from medcritical.prompts import load_prompt
from medcritical.selfplay.run import _teacher_settings
from tests.fixtures.chat_endpoint import StandInEndpoint, completion


def test_evaluation_fingerprint_holds_every_prompt_the_judge_model_backend_and_dtype(tiny_model, bundled, monkeypatch):
    questions = bundled[:3]
    monkeypatch.setenv("MEDCRITICAL_JUDGE_MODEL", "QwQ-32B")
    paper = EvaluateSection(protocol="judge-paper")
    fingerprint = evaluation_fingerprint(paper, GenerationSection(), questions, tiny_model, device="cpu")
    assert fingerprint["prompts"] == [load_prompt("student_paper").version, load_prompt("judge_paper").version]
    assert fingerprint["evaluate"]["judge"]["model"] == "QwQ-32B"  # resolved, not None
    assert fingerprint["generation"] == {"backend": "transformers", "dtype": "float32", "max_new_tokens": 256}
    rubric = evaluation_fingerprint(
        EvaluateSection(protocol="judge-rubric"), GenerationSection(), questions, tiny_model
    )
    assert rubric["prompts"] == [load_prompt("open").version, load_prompt("judge_rubric").version]

    monkeypatch.setenv("MEDCRITICAL_JUDGE_MODEL", "another-judge")
    assert evaluation_fingerprint(paper, GenerationSection(), questions, tiny_model, device="cpu") != fingerprint
    half = evaluation_fingerprint(paper, GenerationSection(), questions, tiny_model, device="cpu", dtype="bfloat16")
    assert half["generation"]["dtype"] == "bfloat16"


def test_a_verdict_resumes_only_under_the_same_prompt_version(tmp_path, bundled, monkeypatch):
    monkeypatch.delenv("MEDCRITICAL_JUDGE_API_KEY", raising=False)
    items = [
        {"id": q.id, "question": q.question, "reference": "x", "explanation": "y", "response": "z"} for q in bundled[:2]
    ]
    # A verdict left by an earlier wording of the judge prompt.
    stale = {"id": items[0]["id"], "protocol": "judge-paper", "verdict": True, "error": None, "reply": "1"}
    (tmp_path / JUDGEMENTS_JSONL).write_text(json.dumps(stale | {"prompt_version": "judge_paper.zh@old"}) + "\n")
    with StandInEndpoint(lambda body, count: completion("2")) as endpoint:
        config = JudgeSection(base_url=endpoint.base_url, model="teacher-model", max_retries=0)
        done = judge_from_config(config, "judge-paper", "zh", tmp_path)(items)
        assert len(endpoint.requests) == 2  # the stale verdict is asked again under today's wording
    assert {row["verdict"] for row in done.values()} == {False}


def test_teacher_settings_resolve_the_environment_and_local_weights(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCRITICAL_TEACHER_MODEL", "Qwen/QwQ-32B")
    monkeypatch.setenv("MEDCRITICAL_TEACHER_BASE_URL", "http://user:secret@qwq:8000/v1")
    served = _teacher_settings(DistillSection(backend="openai", openai=OpenAITeacher()))
    assert served["openai"]["model"] == "Qwen/QwQ-32B"
    assert "qwq:8000" in served["openai"]["base_url"] and "secret" not in served["openai"]["base_url"]

    local = _teacher_settings(DistillSection(backend="transformers", teacher_model=str(tiny_model)))
    assert local["weights"] == model_fingerprint(tiny_model) and local["dtype"] == "auto"


def test_an_adapter_is_fingerprinted_with_its_base_model(tiny_model, tmp_path):
    """The same adapter files over a retrained base model are another model."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"the same adapter weights")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    before = model_fingerprint(adapter)
    weights = next(base.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)  # the base retrained in its folder
    assert model_fingerprint(adapter) != before


def test_rollout_fingerprint_holds_the_backend_dtype_and_resolved_teacher(tiny_model, bundled, tmp_path, monkeypatch):
    """A rollout folder sampled in float32 must not be resumed in bfloat16 or on vLLM (the same seeds
    sample apart), nor a teacher arm's corrections under another teacher named by the environment."""
    from medcritical.io.fingerprint import ResumeMismatch, check_resume
    from medcritical.selfplay.config import SelfPlaySection
    from medcritical.selfplay.run import rollout_fingerprint

    questions = bundled[:3]
    config = SelfPlaySection(corrector="teacher")
    distill = DistillSection(backend="openai", openai=OpenAITeacher())
    monkeypatch.setenv("MEDCRITICAL_TEACHER_MODEL", "Qwen/QwQ-32B")

    def fingerprint(**kwargs):
        setup = {"device": "cpu", "dtype": "auto", "generation": GenerationSection()} | kwargs
        generation = setup.pop("generation")
        return rollout_fingerprint(config, generation, questions, tiny_model, seed=0, distill=distill, **setup)

    first = fingerprint()
    assert first["generation"] == {"backend": "transformers", "dtype": "float32"}
    assert first["teacher"]["openai"]["model"] == "Qwen/QwQ-32B"  # resolved, not None
    assert set(first["prompts"]) == {"mcq", "correction", "rewrite"}
    check_resume(tmp_path, first)
    (tmp_path / "rollouts.jsonl").write_text("{}\n")
    assert check_resume(tmp_path, fingerprint(), outputs=["rollouts.jsonl"])  # the same setup resumes
    for changed in (
        fingerprint(dtype="bfloat16"),
        fingerprint(generation=GenerationSection(backend="vllm")),
    ):
        with pytest.raises(ResumeMismatch, match="generation"):
            check_resume(tmp_path, changed, outputs=["rollouts.jsonl"])
    monkeypatch.setenv("MEDCRITICAL_TEACHER_MODEL", "another-teacher")
    with pytest.raises(ResumeMismatch, match="teacher"):
        check_resume(tmp_path, fingerprint(), outputs=["rollouts.jsonl"])


def test_a_local_teachers_distillation_is_fingerprinted_with_its_dtype(tiny_model):
    """A local teacher's replies sampled in float32 are not resumed by a bfloat16 rerun (the same seeds
    sample apart); the fingerprint named its weights but not the dtype they ran in."""
    from medcritical.distill.config import LocalTeacher
    from medcritical.distill.run import setup_fingerprint
    from medcritical.distill.teachers import build_teacher
    from medcritical.distill.traces import DistillPrompts

    prompts = DistillPrompts.load("zh")

    def fingerprint(dtype):
        config = DistillSection(backend="transformers", teacher_model=str(tiny_model), local=LocalTeacher(dtype=dtype))
        teacher = build_teacher(config, prompts, device="cpu")
        try:
            return setup_fingerprint(config, prompts, teacher)
        finally:
            teacher.close()

    assert fingerprint("auto")["dtype"] == "float32" == fingerprint("float32")["dtype"]
    assert fingerprint("bfloat16")["dtype"] == "bfloat16"
