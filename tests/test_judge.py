"""The judge protocols' own logic: strict verdicts, what the student and the judge are asked, dropped
rows, and judge endpoint outages that end the evaluation non-zero and a rerun that asks exactly the
missing verdicts. The faults come from the scripted stand-in (a real server cannot fail on cue); the
protocols against real vLLM are in tests/test_served_judge.py."""

import json

import pytest

from medcritical.evaluation.config import EvaluateSection, JudgeSection
from medcritical.evaluation.evaluate import evaluate_model
from medcritical.evaluation.judge import (
    JUDGEMENTS_JSONL,
    grade_with_judge,
    judge_request,
    paper_response,
    parse_paper_verdict,
    parse_rubric_verdict,
    reference_answer,
    student_prompts,
    student_sampling,
)
from medcritical.modeling.config import GenerationSection
from medcritical.modeling.llm_client import EndpointError, EndpointFailures
from tests.fixtures.chat_endpoint import Response, StandInEndpoint, completion, fast_sdk_retries

# SP-Huatuo's exact wording (destinybird/SP-Huatuo, commit 5bc1ac53, Processingfiles/ForTest.py and
# Processingfiles/ForJudge.py), copied here by hand so the prompt files cannot drift from it unseen.
SP_HUATUO_STUDENT = (
    "你是一位医学专家，请先深呼吸，然后用中文一步一步地思考并回答这个问题，给出分点罗列的解释：问题：{question}？"
    "只解释这一个问题即可"
)
SP_HUATUO_JUDGE = (
    "这是一位小模型对问题的回复内容，根据其内容判断其是否做到了正确回复。问题：{question}？"
    "答案是：{answer}，小模型回复：{response}。"
    "如果正确，则只直接回复1。如果错误，则只直接回复2"
)
SP_HUATUO_SYSTEM = "You are a helpful assistant."


@pytest.mark.parametrize(
    "reply,verdict",
    [
        ("1", True),
        ("2", False),
        (" 1\n", True),
        ("12", None),
        ("1.", None),
        ("正确", None),
        ("", None),
        ("答案是1", None),
    ],
)
def test_paper_verdict_is_one_token_1_or_2(reply, verdict):
    assert parse_paper_verdict(reply) is verdict


@pytest.mark.parametrize(
    "reply,verdict",
    [
        ("判定：正确", True),
        ("判定：错误", False),
        ("理由：与参考答案一致。\n判定：正确", True),
        ("判定: 错误。", False),
        ("Verdict: correct", True),
        ("The reasons.\nVERDICT: Incorrect.", False),
        ("<think>想想</think>\n判定：错误", False),
        # Never a guess: anything but the strict last line is an error.
        ("The answer is not correct.", None),
        ("不完全正确", None),
        ("正确", None),
        ("correct", None),
        ("判定：正确\n但也可能错误", None),
        ("判定：部分正确", None),
        ("", None),
    ],
)
def test_rubric_verdict_is_a_strict_last_line(reply, verdict):
    assert parse_rubric_verdict(reply) is verdict


def test_what_the_student_and_the_judge_are_asked(bundled):
    q = bundled[0]
    raw = student_prompts("judge-paper", [q], "zh", chat_template=False)[0]
    assert raw == SP_HUATUO_STUDENT.format(question=q.question)  # ForTest.py's wording, not the bare stem
    assert all(text not in raw for text in q.options.values())
    assert student_prompts("judge-paper", [q], "zh", chat_template=True)[0] == [{"role": "user", "content": raw}]
    open_prompt = student_prompts("judge-rubric", [q], "zh", chat_template=False)[0][0]["content"]
    assert q.question in open_prompt and "<think>" in open_prompt
    assert student_sampling("judge-paper", 999) == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 450}
    assert student_sampling("judge-rubric", 64) == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 64}
    assert reference_answer(q) == "；".join(q.options[letter] for letter in q.answer)  # texts, no letters

    assert judge_request("judge-paper", JudgeSection()) == {
        "temperature": 0.0,
        "max_tokens": 1,
        "structured_outputs": {"choice": ["1", "2"]},
    }
    assert judge_request("judge-paper", JudgeSection(verdict_constraint="guided_choice"))["guided_choice"] == ["1", "2"]
    assert judge_request("judge-paper", JudgeSection(verdict_constraint="none")) == {
        "temperature": 0.0,
        "max_tokens": 1,
    }
    assert judge_request("judge-rubric", JudgeSection(max_tokens=300)) == {"temperature": 0.0, "max_tokens": 300}


def test_judge_errors_are_dropped_and_counted_never_guessed(bundled):
    questions = bundled[:4]
    outputs = {q.id: {"output": f"<think>x</think>回答{i}"} for i, q in enumerate(questions)}
    verdicts = [True, False, None, True]

    def judge(items):
        assert [item["response"] for item in items] == ["回答0", "回答1", "回答2", "回答3"]  # rubric: after </think>
        return {
            item["id"]: {"verdict": v, "error": None if v is not None else "no judge-rubric verdict", "reply": "?"}
            for item, v in zip(items, verdicts)
        }

    rows = grade_with_judge("judge-rubric", questions, outputs, judge)
    assert [r["correct"] for r in rows] == [True, False, False, True]
    assert [r["verdict"] for r in rows] == verdicts and rows[2]["judge_error"].startswith("no judge-rubric")


@pytest.fixture
def judge_env(monkeypatch):
    fast_sdk_retries(monkeypatch)
    monkeypatch.delenv("MEDCRITICAL_JUDGE_API_KEY", raising=False)


def paper_config(url, **judge):
    return EvaluateSection(
        protocol="judge-paper",
        judge=JudgeSection(base_url=url, model="teacher-model", max_retries=1, timeout_s=0.5, **judge),
    )


def evaluate_by_paper_judge(url, questions, model, folder, max_new_tokens=8):
    """The tiny model answers `questions`, the judge at `url` grades them (protocol judge-paper)."""
    return evaluate_model(
        paper_config(url), GenerationSection(max_new_tokens=max_new_tokens), questions, model, folder, device="cpu"
    )


FAULTS = {
    "HTTP 502": Response(502, {"error": "bad gateway"}),
    "timed out": Response(delay_s=1.5, body={}),
    "malformed response": Response(200, "{not json"),
    "connection error": Response(body=completion("1").body, drop=True),
}


@pytest.mark.parametrize("kind", FAULTS)
def test_judge_outage_ends_non_zero_and_the_rerun_asks_only_the_missing(kind, tmp_path, tiny_model, bundled, judge_env):
    questions = bundled[:6]
    broken = {questions[2].question, questions[5].question}
    fixed = []

    def respond(body, count):
        prompt = body["messages"][-1]["content"]
        if not fixed and any(stem in prompt for stem in broken):
            return FAULTS[kind]
        if questions[0].question in prompt:
            return completion("我觉得对")  # not 1 or 2: a judge error, dropped
        return completion("1" if questions[1].question in prompt or questions[2].question in prompt else "2")

    generation = GenerationSection(max_new_tokens=8)
    with StandInEndpoint(respond) as endpoint:
        config = paper_config(endpoint.base_url, max_unusable_share=0.2)  # 1 unusable of 6 is allowed here
        with pytest.raises(EndpointFailures) as error:
            evaluate_model(config, generation, questions, tiny_model, tmp_path, device="cpu")
        message = str(error.value)
        assert (
            message.startswith(f"evaluate (judge-paper): 2 requests to {endpoint.base_url}") and f"2 {kind}" in message
        )
        assert "rerun" in message and not (tmp_path / "report.json").exists()  # no number from an outage
        saved = [json.loads(line) for line in (tmp_path / JUDGEMENTS_JSONL).read_text().splitlines()]
        assert len(saved) == 4 and {r["id"] for r in saved}.isdisjoint({questions[2].id, questions[5].id})

        fixed.append(True)
        asked_before = len(endpoint.requests)
        report = evaluate_model(config, generation, questions, tiny_model, tmp_path, device="cpu")
        asked_again = endpoint.user_texts()[asked_before:]
    assert sorted(next(q.id for q in questions if q.question in t) for t in asked_again) == sorted(
        [questions[2].id, questions[5].id]
    )
    # The paper's denominator: judged rows only; the judge error is dropped and counted beside it.
    assert (report["protocol"], report["n"], report["correct"], report["dropped"], report["questions"]) == (
        "judge-paper",
        5,
        2,
        1,
        6,
    )
    assert report["dropped_ids"] == [questions[0].id]
    assert "2/5; 1 of 6 dropped: no verdict, bounds 33.3–50.0%" in (tmp_path / "report.md").read_text()
    assert report["bounds"] == {"drops_as_wrong": 2 / 6, "drops_as_right": 3 / 6}
    body = endpoint.requests[0]["body"]
    assert body["max_tokens"] == 1 and body["structured_outputs"] == {"choice": ["1", "2"]}
    outputs = [json.loads(line) for line in (tmp_path / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 6  # the student answered once; the rerun only judged


def test_judge_endpoint_is_probed_before_the_student_generates(tmp_path, tiny_model, bundled, judge_env, monkeypatch):
    with StandInEndpoint(lambda body, count: completion("1")) as endpoint:
        url = endpoint.base_url  # stopped when the block ends: nothing listens there any more
    with pytest.raises(EndpointError, match="cannot be reached"):
        evaluate_by_paper_judge(url, bundled[:2], tiny_model, tmp_path, max_new_tokens=4)
    assert not (tmp_path / "outputs.jsonl").exists()
    monkeypatch.delenv("MEDCRITICAL_JUDGE_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="MEDCRITICAL_JUDGE_BASE_URL"):
        evaluate_model(
            EvaluateSection(protocol="judge-rubric"),
            GenerationSection(max_new_tokens=4),
            bundled[:2],
            tiny_model,
            tmp_path,
            device="cpu",
        )


def test_old_protocol_name_is_refused():
    with pytest.raises(ValueError, match="judge-paper"):
        EvaluateSection(protocol="judge")


def test_judge_paper_asks_in_sp_huatuos_words(tmp_path, tiny_model, bundled, judge_env):
    """Issue 24: the student got the bare stem and the judge a paraphrase. Both now get SP-Huatuo's exact
    wording, the judge with ForJudge.py's system message, reading the reply after an echoed instruction."""
    questions = bundled[:3]
    with StandInEndpoint(lambda body, count: completion("1")) as endpoint:
        report = evaluate_by_paper_judge(endpoint.base_url, questions, tiny_model, tmp_path)
    assert report["correct"] == 3 and report["dropped"] == 0
    outputs = {r["id"]: r["output"] for r in map(json.loads, (tmp_path / "outputs.jsonl").read_text().splitlines())}
    by_question = {r["body"]["messages"][-1]["content"]: r["body"]["messages"] for r in endpoint.requests}
    for q in questions:
        expected = SP_HUATUO_JUDGE.format(
            question=q.question, answer=reference_answer(q), response=paper_response(outputs[q.id])
        )
        assert by_question[expected] == [
            {"role": "system", "content": SP_HUATUO_SYSTEM},
            {"role": "user", "content": expected},
        ]
    # ForJudge.py judges what follows an echoed instruction.
    assert paper_response("……问题：X？只解释这一个问题即可\n1. 是A") == "1. 是A"
    assert paper_response(" 直接回答 ") == "直接回答"


def test_more_than_1_percent_unusable_verdicts_fail_the_evaluation(tmp_path, tiny_model, bundled, judge_env):
    """A server that ignores the 1/2 constraint must not turn a run into "accuracy over the rows that
    parsed": above evaluate.judge.max_unusable_share (1%) the evaluation fails; the report keeps the bounds."""
    from medcritical.evaluation.evaluate import UnusableVerdicts

    questions = bundled[:6]

    def respond(body, count):
        return completion("好" if questions[0].question in body["messages"][-1]["content"] else "1")

    unusable = r"1 of 6 judge verdicts are unusable.*max_unusable_share=0.01"
    with StandInEndpoint(respond) as endpoint, pytest.raises(UnusableVerdicts, match=unusable):
        evaluate_by_paper_judge(endpoint.base_url, questions, tiny_model, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["n"], report["dropped"], report["bounds"]) == (
        5,
        1,
        {"drops_as_wrong": 5 / 6, "drops_as_right": 1.0},
    )


def test_dropped_verdicts_are_left_out_alike_by_report_compare_and_arms(tmp_path, bundled):
    """graded.jsonl counted a dropped verdict as wrong (3/10) where report.json left it out (3/6): the paired
    tests, `compare` and `arms` now read correctness through one reader that drops the same ids."""
    from medcritical.evaluation.compare import compare, correct_by_id
    from medcritical.evaluation.metrics import summarize
    from medcritical.evaluation.report import write_report
    from medcritical.orchestration.arms import _graded

    questions = bundled[:10]
    verdicts = [True, True, True, None, None, None, None, False, False, False]

    def judge(items):
        return {
            i["id"]: {"verdict": v, "error": None if v is not None else "no verdict", "reply": "x"}
            for i, v in zip(items, verdicts)
        }

    outputs = {q.id: {"output": "答"} for q in questions}
    rows = grade_with_judge("judge-paper", questions, outputs, judge)
    kept = [r for r in rows if not r["dropped"]]
    report = summarize(
        "judge-paper", [q for q in questions if q.id in {r["id"] for r in kept}], {r["id"]: r["correct"] for r in kept}
    )
    for name in ("a", "b"):
        write_report(report, rows, tmp_path / name)
    assert (report["correct"], report["n"]) == (3, 6)
    correct = correct_by_id(tmp_path / "a")
    assert (sum(correct.values()), len(correct)) == (3, 6)
    assert set(correct) == {r["id"] for r in kept} and _graded(tmp_path / "a") == correct
    (row,) = compare(tmp_path / "a", tmp_path / "b")
    assert row["n"] == 6


def test_docs_quote_sp_huatuos_wording_as_the_tests_hold_it():
    """docs/judge.md quotes SP-Huatuo's wording (not its code): the quotes must be the words checked above."""
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "judge.md").read_text(encoding="utf-8")
    quotes = [line[2:] for line in docs.splitlines() if line.startswith("> ")]
    names = {"{user_question}": "{question}", "{small_model_response}": "{response}"}
    for theirs, ours in names.items():
        quotes = [q.replace(theirs, ours) for q in quotes]
    assert SP_HUATUO_STUDENT in quotes and SP_HUATUO_JUDGE in quotes and SP_HUATUO_SYSTEM in quotes


def test_the_run_report_shows_dropped_verdicts_and_bounds_beside_the_accuracy():
    from medcritical.orchestration.report import _accuracy_cell

    report = {"accuracy": 0.5, "correct": 3, "n": 6, "ci95": [0.2, 0.8], "dropped": 4, "questions": 10}
    report["bounds"] = {"drops_as_wrong": 0.3, "drops_as_right": 0.7}
    assert _accuracy_cell(report) == "50.0% (3/6; 4 of 10 dropped: no verdict, bounds 30.0–70.0%; 95% CI 20.0–80.0)"
