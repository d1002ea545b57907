"""Rollout and self-correction on a real tiny model with the real grader."""

import json

import pytest

from medcritical.grader import grade_answer
from medcritical.io.fingerprint import model_fingerprint
from medcritical.io.jsonl import read_jsonl
from medcritical.modeling.generation import TransformersGenerator
from medcritical.selfplay.chance import guess_probability, guessing_acceptance
from medcritical.selfplay.config import CorrectionSection, RolloutSection, SelfPlaySection
from medcritical.selfplay.correction import correct_trajectories, correction_statistics
from medcritical.selfplay.rollout import rollout_questions, rollout_statistics
from medcritical.selfplay.standalone import refers_back

ROLLOUT = RolloutSection(samples_per_question=3, temperature=1.0, top_p=1.0, max_new_tokens=48, chunk_size=8)


class CountingGenerator:
    """The real generator, counting how many prompts it was asked to answer (to see resumes skip work)."""

    def __init__(self, generator):
        self.generator, self.prompts = generator, 0

    def generate(self, prompts, **kwargs):
        self.prompts += len(prompts)
        return self.generator.generate(prompts, **kwargs)


@pytest.fixture(scope="module")
def generator(format_model):
    return TransformersGenerator(format_model, device="cpu", batch_size=16)


def test_rollout_grades_every_sample(generator, selfplay_questions, tmp_path):
    questions = selfplay_questions[:12]
    records = rollout_questions(generator, questions, ROLLOUT, tmp_path / "rollouts.jsonl", seed=1)

    assert len(records) == 12 * 3
    assert read_jsonl(tmp_path / "rollouts.jsonl") == records
    by_id = {q.id: q for q in questions}
    for r in records:
        grade = grade_answer(r["trajectory"], by_id[r["question_id"]].answer, by_id[r["question_id"]].options)
        assert (r["predicted"], r["correct"]) == (grade.predicted, grade.correct)
        assert r["gold"] == by_id[r["question_id"]].answer and 0 < r["num_tokens"] <= 48
    assert {(r["question_id"], r["sample"]) for r in records} == {(q.id, s) for q in questions for s in range(3)}
    # The format model answers in format, right sometimes and wrong often: both kinds exist.
    assert any(r["correct"] for r in records) and not all(r["correct"] for r in records)

    stats = rollout_statistics(records, ROLLOUT.max_new_tokens)
    assert stats["questions"] == 12 and stats["samples"] == 36
    assert stats["pass@1"] == pytest.approx(sum(r["correct"] for r in records) / 36)
    assert stats["pass@1"] <= stats["pass@k"] <= 1
    assert stats["all_wrong"] == pytest.approx(1 - stats["pass@k"])
    assert 0 <= stats["all_right"] <= stats["pass@1"]


def test_rollout_resumes_and_redoes_torn_work(generator, selfplay_questions, tmp_path):
    path = tmp_path / "rollouts.jsonl"
    counting = CountingGenerator(generator)
    first = rollout_questions(counting, selfplay_questions[:4], ROLLOUT, path)
    assert counting.prompts == 4
    # A crash mid-write: the last question has only part of its samples and a torn line.
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:-2]) + '\n{"question_id": "to', encoding="utf-8")

    again = rollout_questions(counting, selfplay_questions[:6], ROLLOUT, path)
    assert counting.prompts == 4 + 3  # the torn question and the two new ones, nothing else
    assert again[:9] == first[:9]
    assert len(read_jsonl(path)) == len(again) == 6 * 3


def test_correction_accepts_only_stable_votes_and_a_standalone_rewrite(generator, selfplay_questions, tmp_path):
    questions = selfplay_questions[:16]
    records = rollout_questions(generator, questions, ROLLOUT, tmp_path / "rollouts.jsonl", seed=2)
    wrong = [r for r in records if not r["correct"]]
    config = CorrectionSection(attempts=2, temperature=1.0, votes=3, rewrite_temperature=1.0)
    by_id = {q.id: q for q in questions}
    corrections = correct_trajectories(
        generator, by_id, wrong, config, tmp_path / "corrections.jsonl", max_new_tokens=48
    )

    assert [(c["question_id"], c["sample"]) for c in corrections] == [(r["question_id"], r["sample"]) for r in wrong]
    for c in corrections:
        question = by_id[c["question_id"]]
        assert c["corrector"] == "self" and 1 <= len(c["attempts"]) <= 2
        for n, attempt in enumerate(c["attempts"]):
            graded = [grade_answer(v["text"], question.answer, question.options).correct for v in attempt["votes"]]
            assert len(graded) == 3 and graded == [v["correct"] for v in attempt["votes"]]
            assert attempt["gold_votes"] == sum(graded) and attempt["stable"] == (sum(graded) >= 2)  # a majority
            assert (
                all(v["completion_tokens"] > 0 for v in attempt["votes"]) and attempt["votes"][0]["prompt_tokens"] > 0
            )
            rewrite = attempt["rewrite"]
            assert (rewrite is not None) == attempt["stable"]  # only a stable correction is rewritten
            if rewrite:
                assert rewrite["correct"] == grade_answer(rewrite["text"], question.answer, question.options).correct
                assert rewrite["refers_back"] == refers_back(rewrite["text"])
            accepted = bool(rewrite and rewrite["correct"] and not rewrite["refers_back"] and rewrite["in_format"])
            assert attempt["accepted"] == accepted
            assert not accepted or n == len(c["attempts"]) - 1  # no attempt after the accepted one
        if c["corrected"]:
            last = c["attempts"][-1]
            assert c["chosen"] == last["rewrite"]["text"] and c["chosen_tokens"] == last["rewrite"]["completion_tokens"]
            assert c["correction"] in [v["text"] for v in last["votes"] if v["correct"]]
            assert (
                grade_answer(c["chosen"], question.answer, question.options).correct
                and refers_back(c["chosen"]) is None
            )
        else:
            assert c["chosen"] is None and len(c["attempts"]) == 2
    stats = correction_statistics(corrections, config, by_id)
    kept = sum(c["corrected"] for c in corrections)
    assert stats["corrected"] == kept and sum(stats["corrected_at_attempt"]) == kept
    assert stats["votes"] == 3 * sum(len(c["attempts"]) for c in corrections)
    assert stats["stable_attempts"] == stats["rewrites"] > 0
    # What guessing alone would have got accepted: a positive expectation, far below one per trajectory.
    assert 0 < stats["expected_by_guessing"] < 0.2 * len(corrections)

    # A rerun finds every trajectory done and generates nothing.
    counting = CountingGenerator(generator)
    assert correct_trajectories(counting, by_id, wrong, config, tmp_path / "corrections.jsonl") == corrections
    assert counting.prompts == 0


def test_guessing_acceptance_matches_the_binomial_rule(bundled):
    single = next(q for q in bundled if not q.is_multi_answer and len(q.options) == 5)
    multi = next(q for q in bundled if q.is_multi_answer and len(q.options) == 5)
    assert guess_probability(single) == pytest.approx(0.2) and guess_probability(multi) == pytest.approx(1 / 26)
    # The old rule (one vote, no rewrite, two attempts) let a guesser through 36% of the time at five options.
    p = 0.2
    one_vote = CorrectionSection(attempts=2, votes=1)
    assert guessing_acceptance(p, one_vote) == pytest.approx(1 - (1 - p * p) ** 2)
    majority = CorrectionSection(attempts=2, votes=3)
    per_attempt = (3 * p**2 * (1 - p) + p**3) * p
    assert guessing_acceptance(p, majority) == pytest.approx(1 - (1 - per_attempt) ** 2)
    assert guessing_acceptance(p, majority) < 0.05
    with pytest.raises(ValueError, match="min_votes"):
        CorrectionSection(votes=2, min_votes=3)


def test_run_rollout_refuses_to_mix_settings(format_model, selfplay_questions, tmp_path):
    from medcritical.modeling.config import GenerationSection
    from medcritical.selfplay.run import run_rollout

    config = SelfPlaySection(rollout=ROLLOUT, correction=CorrectionSection(attempts=1))
    stats = run_rollout(config, GenerationSection(), selfplay_questions[:4], format_model, tmp_path, device="cpu")
    assert json.loads((tmp_path / "rollout_stats.json").read_text())["rollout"] == stats["rollout"]
    with pytest.raises(ValueError, match="other inputs or settings.*rollout"):
        changed = config.model_copy(update={"rollout": ROLLOUT.model_copy(update={"temperature": 0.5})})
        run_rollout(changed, GenerationSection(), selfplay_questions[:4], format_model, tmp_path, device="cpu")


def _cost_of(stats):
    return stats["cost"]["student_by_phase"], stats["cost"]["teacher"]


def test_teacher_corrector_reads_the_wrong_trajectory_and_the_student_rewrites(
    format_model, selfplay_questions, tmp_path
):
    """corrector: teacher with a local transformers teacher (the format model standing in for a bigger one):
    the corrections are the teacher's, counted as teacher tokens; the rewrite is still the student's."""
    from medcritical.distill.config import DistillSection
    from medcritical.modeling.config import GenerationSection
    from medcritical.selfplay.run import run_rollout

    distill = DistillSection(
        backend="transformers",
        teacher_model=str(format_model),
        temperature=1.0,
        max_new_tokens=48,
        price_per_million_tokens=2.0,
    )
    config = SelfPlaySection(rollout=ROLLOUT, correction=CorrectionSection(attempts=1, votes=3), corrector="teacher")
    stats = run_rollout(
        config, GenerationSection(), selfplay_questions[:8], format_model, tmp_path, device="cpu", distill=distill
    )

    assert stats["corrector"] == {
        "corrector": "teacher",
        "backend": "transformers",
        "model": format_model.name,
        "weights": model_fingerprint(format_model),  # part of the rollout's resume fingerprint
        "dtype": "float32",  # "auto" on a CPU
    }
    records = read_jsonl(tmp_path / "corrections.jsonl")
    assert records and {r["corrector"] for r in records} == {"teacher"}
    phases, teacher = _cost_of(stats)
    votes = [v for r in records for a in r["attempts"] for v in a["votes"]]
    assert teacher["completion_tokens"] == sum(v["completion_tokens"] for v in votes) > 0
    assert teacher["prompt_tokens"] > 0  # counted with the teacher's tokenizer: a local model reports none
    assert phases["correction"] == {}  # the student wrote no correction
    rewrites = [a["rewrite"] for r in records for a in r["attempts"] if a["rewrite"]]
    assert phases["rewrite"].get("completion_tokens", 0) == sum(w["completion_tokens"] for w in rewrites)
    money = stats["cost"]["money"]
    assert money["teacher"] == pytest.approx((teacher["prompt_tokens"] + teacher["completion_tokens"]) * 2.0 / 1e6)

    # Another teacher is another input: the folder refuses to mix, and restart starts over.
    other = distill.model_copy(update={"temperature": 0.5})
    with pytest.raises(ValueError, match="teacher"):
        run_rollout(
            config, GenerationSection(), selfplay_questions[:8], format_model, tmp_path, device="cpu", distill=other
        )
    run_rollout(
        config,
        GenerationSection(),
        selfplay_questions[:8],
        format_model,
        tmp_path,
        device="cpu",
        distill=other,
        restart=True,
    )


def test_explanations_teacher_corrects_with_the_expert_explanation(generator, selfplay_questions, tmp_path):
    """The demo's offline teacher: every vote is the expert explanation and gold answer, so every wrong
    trajectory with an explanation gets a stable correction; the rewrite decides acceptance."""
    from medcritical.distill.config import DistillSection
    from medcritical.selfplay.run import build_corrector

    questions = selfplay_questions[:8]
    records = rollout_questions(generator, questions, ROLLOUT, tmp_path / "rollouts.jsonl", seed=3)
    wrong = [r for r in records if not r["correct"]]
    config = SelfPlaySection(corrector="teacher", correction=CorrectionSection(attempts=1, votes=3))
    corrector = build_corrector(config, generator, DistillSection(backend="explanations", explanation_max_chars=40))
    by_id = {q.id: q for q in questions}
    corrections = correct_trajectories(
        generator, by_id, wrong, config.correction, tmp_path / "c.jsonl", corrector=corrector, max_new_tokens=48
    )
    for c in corrections:
        attempt = c["attempts"][0]
        has_explanation = bool(by_id[c["question_id"]].explanation.strip())
        assert attempt["stable"] == has_explanation and attempt["gold_votes"] == (3 if has_explanation else 0)
        if attempt["stable"]:
            assert by_id[c["question_id"]].explanation.strip()[:40] in attempt["votes"][0]["text"]
            assert attempt["rewrite"] is not None


def test_a_teacher_that_answers_nothing_stops_the_correction(bundled):
    """The explanations teacher errs on a question without an explanation; when every request errs the
    step fails instead of reporting zero accepted corrections."""
    from dataclasses import replace

    from medcritical.distill.config import DistillSection
    from medcritical.distill.teachers import build_teacher
    from medcritical.distill.traces import DistillPrompts
    from medcritical.selfplay.correction import TeacherCorrector, correction_messages

    question = replace(bundled[0], explanation="")
    teacher = TeacherCorrector(build_teacher(DistillSection(backend="explanations"), DistillPrompts.load("zh")))
    with pytest.raises(RuntimeError, match="answered none of 3 correction requests"):
        teacher.correct(
            [correction_messages(question, "答案：A")],
            [question],
            votes=3,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=16,
            seed=0,
            attempt=1,
        )


def test_served_teacher_reads_the_wrong_trajectory_and_its_usage_is_counted(bundled, monkeypatch):
    """The openai backend (a served QwQ-style teacher) through the stand-in endpoint: the request carries
    the student's wrong answer, the reasoning returned apart is put back inside <think>, and the tokens are
    the endpoint's own usage figures (what an API bills)."""
    from medcritical.distill.config import DistillSection, OpenAITeacher
    from medcritical.distill.teachers import build_teacher
    from medcritical.distill.traces import DistillPrompts
    from medcritical.selfplay.correction import TeacherCorrector, correction_messages
    from tests.fixtures.chat_endpoint import StandInEndpoint, completion

    monkeypatch.setenv("MEDCRITICAL_TEACHER_API_KEY", "sk-test")
    question = next(q for q in bundled if not q.is_multi_answer)
    wrong = "<think>草率</think>\n答案：" + next(x for x in question.options if x != question.answer)

    def respond(body, count):
        return completion(f"答案：{question.answer}", "重新逐项分析选项", prompt_tokens=321, completion_tokens=45)

    with StandInEndpoint(respond) as endpoint:
        distill = DistillSection(
            backend="openai", openai=OpenAITeacher(base_url=endpoint.base_url, model="QwQ-32B", max_retries=0)
        )
        corrector = TeacherCorrector(build_teacher(distill, DistillPrompts.load("zh")), max_new_tokens=64)
        (votes,) = corrector.correct(
            [correction_messages(question, wrong)],
            [question],
            votes=2,
            temperature=0.7,
            top_p=0.95,
            max_new_tokens=16,
            seed=0,
            attempt=1,
        )
        assert len(endpoint.requests) == 2 and all(wrong in text for text in endpoint.user_texts())
        assert {r["body"]["max_tokens"] for r in endpoint.requests} == {64}  # the teacher's own budget
    assert corrector.description["backend"] == "openai" and corrector.description["model"] == "QwQ-32B"
    for vote in votes:
        assert vote.text == f"<think>\n重新逐项分析选项\n</think>\n答案：{question.answer}"
        assert (vote.prompt_tokens, vote.completion_tokens, vote.error) == (321, 45, None)
        assert grade_answer(vote.text, question.answer, question.options).correct


def test_teacher_votes_and_attempts_are_seeded_apart_at_an_endpoint(bundled, generator, monkeypatch, tmp_path):
    """Issue 24: an endpoint teacher got one `seed` for every vote and every attempt, so a server that
    honours seeds answered the three votes with one text (and attempt 2 repeated attempt 1): the 2-of-3
    stability filter then bit only the self arm. Every vote of every attempt now carries its own seed,
    the same one again on a rerun (a resumed run samples as an uninterrupted one)."""
    from medcritical.distill.config import DistillSection, OpenAITeacher
    from medcritical.distill.teachers import build_teacher
    from medcritical.distill.traces import DistillPrompts
    from medcritical.selfplay.correction import TeacherCorrector
    from tests.fixtures.chat_endpoint import StandInEndpoint, completion

    monkeypatch.setenv("MEDCRITICAL_TEACHER_API_KEY", "sk-test")
    chosen = [q for q in bundled if not q.is_multi_answer][:2]
    questions = {q.id: q for q in chosen}
    wrong = [
        {"question_id": q.id, "sample": s, "trajectory": "答案：" + next(x for x in q.options if x != q.answer)}
        for q in chosen
        for s in (0, 1)
    ]

    def never_gold(body, count):  # every vote wrong: both attempts run, no rewrite
        return completion("<think>再看一遍</think>\n答案：无法确定")

    def seeds_sent(tmp):
        with StandInEndpoint(never_gold) as endpoint:
            distill = DistillSection(
                backend="openai", openai=OpenAITeacher(base_url=endpoint.base_url, model="QwQ-32B", max_retries=0)
            )
            corrector = TeacherCorrector(build_teacher(distill, DistillPrompts.load("zh")))
            correct_trajectories(
                generator,
                questions,
                wrong,
                CorrectionSection(attempts=2, votes=3),
                tmp,
                corrector=corrector,
                seed=7,
            )
            return [r["body"]["seed"] for r in endpoint.requests]

    seeds = seeds_sent(tmp_path / "first.jsonl")
    assert len(seeds) == 4 * 2 * 3  # 4 trajectories x 2 attempts x 3 votes
    assert len(set(seeds)) == len(seeds)  # no two votes, attempts or trajectories share a seed
    again = seeds_sent(tmp_path / "again.jsonl")
    assert sorted(again) == sorted(seeds)  # keyed by trajectory, attempt and vote: reproducible


def test_local_teacher_votes_are_sampled_on_separate_streams(generator, selfplay_questions):
    """The local (transformers / vLLM) teacher keyed its seeds by question, kind and attempt only, so the
    votes on one correction prompt were one sample repeated. Each vote now has its own sampling key."""
    from medcritical.distill.teachers import LocalModelTeacher
    from medcritical.modeling.generation import sample_seed
    from medcritical.selfplay.correction import TeacherCorrector, correction_messages

    class KeyRecorder:  # the real generator, recording the sampling keys it is given
        def __init__(self, inner):
            self.inner, self.keys = inner, []

        def generate(self, prompts, **kwargs):
            self.keys += kwargs["keys"]
            return self.inner.generate(prompts, **kwargs)

    recorder = KeyRecorder(generator)
    teacher = LocalModelTeacher(recorder, name="tiny", backend="transformers", temperature=1.0, top_p=1.0, batch_size=8)
    question = selfplay_questions[0]
    prompt = correction_messages(question, "答案：A")
    for attempt in (1, 2):
        (votes,) = TeacherCorrector(teacher).correct(
            [prompt],
            [question],
            votes=3,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=8,
            seed=0,
            attempt=attempt,
            keys=[f"{question.id}#0#correction{attempt}"],
        )
        assert len(votes) == 3
    assert len(recorder.keys) == 6
    assert len({sample_seed(0, key, 0) for key in recorder.keys}) == 6  # 3 votes x 2 attempts, 6 streams


def test_placebo_measures_chance_on_the_same_trajectories(bundled):
    """Issue 24 item 3: "beyond luck" assumed independent uniform guesses. The placebo measures chance on
    the real votes: a corrector whose votes settle on any option it was not told is wrong scores as well
    for a stand-in gold as for the real one; the analytic figure is then far below (a lower bound)."""
    from medcritical.selfplay.chance import placebo_acceptance, placebo_target

    question = next(q for q in bundled if not q.is_multi_answer and len(q.options) == 5)
    rejected = next(x for x in question.options if x != question.answer)
    questions = {question.id: question}
    config = CorrectionSection(attempts=2, votes=3)

    def record(sample, letters_by_attempt, accepted):
        attempts = [
            {
                "votes": [{"predicted": x, "correct": x == question.answer} for x in letters],
                "stable": sum(x == question.answer for x in letters) >= 2,
                "rewrite": {} if sum(x == question.answer for x in letters) >= 2 else None,
                "accepted": accepted and sum(x == question.answer for x in letters) >= 2,
                "reason": None,
            }
            for letters in letters_by_attempt
        ]
        return {"question_id": question.id, "sample": sample, "attempts": attempts, "corrected": accepted}

    # A consistent guesser: three votes on one option, whichever it is, every attempt.
    targets = {s: placebo_target(question, rejected, f"{question.id}#{s}#placebo") for s in range(40)}
    assert all(t not in (None, question.answer, rejected) for t in targets.values())
    guesser = [record(s, [[targets[s]] * 3, [question.answer] * 3], accepted=True) for s in range(40)]
    measured = placebo_acceptance(guesser, config, questions, {(question.id, s): rejected for s in range(40)})
    assert measured["trajectories"] == 40 and measured["rewrite_follows"] == 1.0
    assert measured["expected"] == pytest.approx(40)  # every stand-in was hit as gold was

    # A corrector whose votes reach only gold: nothing for the stand-in.
    honest = [record(s, [[question.answer] * 3], accepted=True) for s in range(40)]
    assert placebo_acceptance(honest, config, questions, {})["expected"] == 0

    stats = correction_statistics(guesser, config, questions, {(question.id, s): rejected for s in range(40)})
    low, high = stats["chance_range"]
    assert low == pytest.approx(stats["expected_by_guessing"]) and high == pytest.approx(40)
    assert stats["expected_by_guessing"] < 5  # the analytic figure: a lower bound, far below


def test_placebo_counts_the_attempts_that_stopped_early(bundled):
    """Issue 24 item 3, left over: a trajectory accepted for gold at attempt 1 stops there, while under the
    placebo (its stand-in missed) it would have had attempt 2. Those attempts counted nothing, so the
    placebo read low. They now count at the stand-in rate of attempts that ran after a stable one (same
    prompt, fresh seed); the old figure stays as `expected_observed`, a lower bound."""
    from medcritical.selfplay.chance import placebo_acceptance, placebo_target

    question = next(q for q in bundled if not q.is_multi_answer and len(q.options) == 5)
    rejected = next(x for x in question.options if x != question.answer)
    questions = {question.id: question}
    config = CorrectionSection(attempts=2, votes=3)
    gold = question.answer

    def attempt(letters, rewrite_accepted=False):
        stable = sum(x == gold for x in letters) >= 2
        return {
            "votes": [{"predicted": x, "correct": x == gold} for x in letters],
            "stable": stable,
            "rewrite": {} if stable else None,
            "accepted": stable and rewrite_accepted,
            "reason": None if stable and rewrite_accepted else "rewrite_wrong" if stable else "unstable",
        }

    def target(sample):
        return placebo_target(question, rejected, f"{question.id}#{sample}#placebo")

    records = []
    # 10 trajectories accepted at their first attempt: no second attempt ran.
    for s in range(10):
        records.append({"question_id": question.id, "sample": s, "attempts": [attempt([gold] * 3, True)]})
    # 4 reached gold but their rewrite failed, so a second attempt ran: 2 of them then settled on the stand-in.
    for s in range(10, 12):
        records.append(
            {"question_id": question.id, "sample": s, "attempts": [attempt([gold] * 3), attempt([target(s)] * 3)]}
        )
    for s in range(12, 14):
        records.append(
            {"question_id": question.id, "sample": s, "attempts": [attempt([gold] * 3), attempt([gold] * 3, True)]}
        )
    for r in records:
        r["corrected"] = r["attempts"][-1]["accepted"]
    placebo = placebo_acceptance(records, config, questions, {(question.id, s): rejected for s in range(14)})

    follow = 12 / 16  # 12 of the 16 stable attempts had their rewrite accepted
    # 2 seen on the stand-in, and the 10 missing second attempts at the rate of those after a stable one (2 of 4).
    assert placebo["expected"] == pytest.approx(2 * follow + 10 * follow * 0.5)  # it was 2 * follow
    assert placebo["expected_observed"] == pytest.approx(2 * follow)  # only the attempts that ran: a lower bound
    assert placebo["imputed_attempts"] == 10 and placebo["imputed_rate"] == pytest.approx(0.5)
    assert placebo["rewrite_follows"] == pytest.approx(follow)
    assert "no rewrite is run" in placebo["rewrite_follows_from"]
