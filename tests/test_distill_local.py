"""The transformers teacher backend end to end with the tiny random model: bookkeeping, not accuracy."""

import shutil

import pytest

from medcritical.distill.config import DistillSection, LocalTeacher
from medcritical.distill.run import RAW_FILE, REJECTED_FILE, SFT_FILE, distill
from medcritical.distill.teachers import build_teacher
from medcritical.distill.traces import DistillPrompts
from medcritical.grader import grade_answer
from medcritical.io.fingerprint import ResumeMismatch, model_fingerprint
from tests.test_distill import read_jsonl


def test_tiny_model_teacher_bookkeeping(tiny_model, bundled, tmp_path):
    questions = bundled[:8]
    config = DistillSection(
        backend="transformers",
        teacher_model=str(tiny_model),
        local=LocalTeacher(batch_size=4),
        attempts=2,
        temperature=0.9,
        max_new_tokens=24,
        template_max_new_tokens=12,
    )
    stats = distill(config, questions, tmp_path, device="cpu")
    events = [e for e in read_jsonl(tmp_path / RAW_FILE) if e["event"] == "reply"]
    by_question = {q.id: [e for e in events if e["id"] == q.id] for q in questions}
    sft_ids = {r["id"] for r in read_jsonl(tmp_path / SFT_FILE)}
    for question in questions:
        traces = [e for e in by_question[question.id] if e["kind"] == "trace"]
        templates = [e for e in by_question[question.id] if e["kind"] == "template"]
        assert 1 <= len(templates) <= 2
        if question.id not in sft_ids:  # every failed question used all its attempts
            assert len(traces) == 2 or (len(templates) == 2 and not traces)
        assert [e["attempt"] for e in traces] == list(range(1, len(traces) + 1))
        assert all(e["reply"]["completion_tokens"] > 0 for e in by_question[question.id])

    rejected = read_jsonl(tmp_path / REJECTED_FILE)
    assert all(r["reason"] for r in rejected)
    trace_events = [e for e in events if e["kind"] == "trace"]
    assert stats["trace_attempts"] == len(trace_events)
    assert stats["template_requests"] == len(events) - len(trace_events)
    assert len([r for r in rejected if r["kind"] == "trace"]) == stats["trace_attempts"] - stats["accepted"]
    assert sum(stats["rejections"].values()) == len(rejected)
    assert stats["accepted"] == len(sft_ids)
    by_type = stats["by_type"]
    assert by_type["single_answer"]["questions"] + by_type["multi_answer"]["questions"] == 8
    assert (
        by_type["single_answer"]["trace_attempts"] + by_type["multi_answer"]["trace_attempts"]
        == stats["trace_attempts"]
    )
    assert stats["tokens"]["completion"] == sum(e["reply"]["completion_tokens"] for e in events) > 0
    assert stats["teacher"] == {
        "backend": "transformers",
        "model": tiny_model.name,
        "weights": model_fingerprint(tiny_model),
        "dtype": "float32",  # "auto" on a CPU
    }
    for row in read_jsonl(tmp_path / SFT_FILE):  # whatever the random model got right truly is right
        question = next(q for q in questions if q.id == row["id"])
        assert grade_answer(row["messages"][-1]["content"], question.answer, question.options).correct

    # Sampling is seeded per attempt: the same inputs give the same outputs.
    again = distill(config, questions, tmp_path / "again", device="cpu")
    assert (tmp_path / "again" / REJECTED_FILE).read_bytes() == (tmp_path / REJECTED_FILE).read_bytes()
    assert again["trace_attempts"] == stats["trace_attempts"]


def test_vllm_backend_without_vllm_says_how_to_fix(tiny_model):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    config = DistillSection(backend="vllm", teacher_model=str(tiny_model))
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        build_teacher(config, DistillPrompts.load("zh"), device="cpu")


def test_a_retrained_teacher_in_the_same_folder_does_not_resume_old_replies(bundled, tiny_model, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model, teacher)
    config = DistillSection(
        backend="transformers", teacher_model=str(teacher), attempts=1, max_new_tokens=8, template_max_new_tokens=8
    )
    distill(config, bundled[:2], tmp_path / "out", device="cpu")
    weights = next(teacher.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")  # "retrained": other weights, same folder
    with pytest.raises(ResumeMismatch, match="weights"):
        distill(config, bundled[:2], tmp_path / "out", device="cpu")
