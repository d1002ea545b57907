"""The vLLM backend against real vLLM (the CPU build, same release as the GPU pin): rollout with k samples
and corrections, evaluation (greedy generation; loglik through prompt_logprobs) and distillation with
`distill.backend: vllm`, on a tiny model of a shape vLLM's CPU attention supports. One engine load runs
every check (tests/vllm_scripts/backend_checks.py); the transformers backend does the same work here on
the same model, and the two are compared.

Where they must agree, and how closely:
- greedy evaluation: the same text for every question. Both run float32 on CPU; a token could differ
  only where the two best logits tie within the kernels' rounding (~1e-5 here), which this trained model
  does not meet on these prompts. A tie would show up here as a differing output, named in the message.
- loglik: each continuation's summed log-probability within 1e-3 (measured: 2e-5) and the same best
  answer: the same float32 weights, different matmul and attention kernels, sums of at most ~15 tokens.
- sampling: never compared text for text. The backends' random streams differ by design; what must
  match are the seed semantics (a sample depends on seed, question and sample index only) and the records
  and statistics' shape and meaning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcritical.distill.run import distill
from medcritical.evaluation import evaluate
from medcritical.modeling.generation import TransformersGenerator
from medcritical.prompts import mcq_messages
from medcritical.selfplay.correction import correct_trajectories
from medcritical.selfplay.rollout import rollout_questions, rollout_statistics
from tests.fixtures.selfplay import train_format_model
from tests.fixtures.vllm import REPO, build_chain_model, run_in_vllm
from tests.vllm_scripts.checks_common import (
    CHAIN_TEXT,
    CONTINUATIONS,
    CUT_LENGTHS,
    correction_config,
    distill_config,
    evaluation_configs,
    questions,
    rollout_config,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model(vllm_model, tmp_path_factory):
    """The vLLM-shaped tiny model, trained briefly to answer in format (so greedy outputs and loglik
    scores mean something: a random model writes newlines)."""
    # The backends are compared on the same model: it must answer in format, not follow every letter of the
    # self-play script (on this shape not every scripted letter reaches 0.9 within the fixture's 1000 steps).
    return train_format_model(vllm_model, tmp_path_factory.getbasetemp() / "vllm-format-model", strict=False)


@pytest.fixture(scope="module")
def vllm_side(vllm_python, model, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("vllm-backend")
    run_in_vllm(vllm_python, REPO / "tests" / "vllm_scripts" / "backend_checks.py", model, work)
    return json.loads((work / "vllm.json").read_text())


@pytest.fixture(scope="module")
def transformers_side(model):
    return TransformersGenerator(model, device="cpu", dtype="float32", batch_size=8)


def fields(records):
    return [sorted(r) for r in records]


def test_vllm_samples_depend_on_question_and_index_not_batch(vllm_side):
    assert vllm_side["reversed"] == vllm_side["together"], "another batch order changed a sample"
    assert vllm_side["alone"] == vllm_side["together"][:2], "a prompt alone sampled differently"
    assert vllm_side["other_seed"] != vllm_side["together"]
    assert all(len(set(samples)) > 1 for samples in vllm_side["together"]), "the n samples of a prompt differ"
    rollout = vllm_side["rollout"]
    key = lambda records: [(r["question_id"], r["sample"], r["trajectory"]) for r in records]  # noqa: E731
    assert key(rollout["split"]) == key(rollout["whole"]), "a split, resumed rollout sampled differently"


def test_rollout_and_corrections_have_the_records_and_statistics_of_transformers(
    vllm_side, transformers_side, tmp_path
):
    pool, config = questions(), rollout_config()
    ours = rollout_questions(transformers_side, pool[:5], config, tmp_path / "rollouts.jsonl", seed=7)
    theirs = vllm_side["rollout"]["whole"]
    assert fields(theirs) == fields(ours)
    assert [(r["question_id"], r["sample"]) for r in theirs] == [(r["question_id"], r["sample"]) for r in ours]
    assert all(1 <= r["num_tokens"] <= config.max_new_tokens for r in theirs)
    # The statistics are the same function of the records on both backends.
    assert vllm_side["rollout"]["stats"] == rollout_statistics(theirs, config.max_new_tokens)
    assert set(vllm_side["rollout"]["stats"]) == set(rollout_statistics(ours, config.max_new_tokens))
    assert any(r["predicted"] for r in theirs), "the trained model states answers under vLLM too"

    corrections = correct_trajectories(
        transformers_side,
        {q.id: q for q in pool[:5]},
        ours,
        correction_config(),
        tmp_path / "corrections.jsonl",
        max_new_tokens=config.max_new_tokens,
        seed=7,
        chunk_size=4,
    )
    theirs = vllm_side["corrections"]
    assert fields(theirs) == fields(corrections)
    attempt_fields = lambda records: {tuple(sorted(a)) for r in records for a in r["attempts"]}  # noqa: E731
    assert attempt_fields(theirs) == attempt_fields(corrections)
    assert all(len(r["attempts"]) == correction_config().attempts or r["corrected"] for r in theirs)


def test_greedy_evaluation_is_the_same_on_both_backends(vllm_side, transformers_side, model, tmp_path):
    eval_config, generation = evaluation_configs("transformers")["generate"]
    report = evaluate.evaluate_model(eval_config, generation, questions(), model, tmp_path, generator=transformers_side)
    ours = {
        json.loads(line)["id"]: json.loads(line)["output"]
        for line in (tmp_path / "outputs.jsonl").read_text().splitlines()
    }
    theirs = {row["id"]: row["output"] for row in vllm_side["evaluation"]["generate"]["outputs"]}
    differing = {i: (ours[i], theirs[i]) for i in ours if ours[i] != theirs.get(i)}
    assert not differing, f"greedy outputs differ (a near-tie in float32 rounding?): {differing}"
    vllm_report = vllm_side["evaluation"]["generate"]["report"]
    assert vllm_report["accuracy"] == report["accuracy"]
    assert vllm_report["backend"] == "vllm" and report["backend"] == "transformers"


@pytest.fixture(scope="module")
def chain_model(vllm_model, tmp_path_factory) -> Path:
    return build_chain_model(vllm_model, tmp_path_factory.mktemp("vllm-chain") / "model", CHAIN_TEXT)


def test_greedy_text_is_the_same_where_the_length_limit_cuts_a_character(vllm_python, chain_model, tmp_path):
    """Both backends decode the generated ids the same way. vLLM's incremental detokenizer holds back an
    unfinished UTF-8 character at the cut; the product decodes the ids as transformers does (seen on an Intel
    Xeon, where the evaluation's 24-token cut fell inside a character: one output was a prefix of the other).
    The chain model writes a known text on any CPU, so the cuts inside a character are certain to happen."""
    run_in_vllm(vllm_python, REPO / "tests" / "vllm_scripts" / "greedy_cuts.py", chain_model, tmp_path)
    theirs = json.loads((tmp_path / "greedy_cuts.json").read_text())
    generator = TransformersGenerator(chain_model, device="cpu", dtype="float32", batch_size=8)
    pool = questions()[:3]
    prompts, keys = [mcq_messages(q) for q in pool], [q.id for q in pool]
    split_characters = 0
    for length in CUT_LENGTHS:
        ours = [[c.text for c in samples] for samples in generator.generate(prompts, keys=keys, max_new_tokens=length)]
        assert ours == theirs[str(length)], f"greedy outputs cut at {length} tokens differ"
        split_characters += sum(text.endswith("\ufffd") for samples in ours for text in samples)
    assert theirs[str(max(CUT_LENGTHS))] == [[CHAIN_TEXT]] * 3, "the chain model did not write its text"
    assert split_characters == 3 * 3, "three cuts of each reply fall inside a character"


def test_loglik_scores_agree_within_float32_rounding(vllm_side, transformers_side):
    prompts = [mcq_messages(q) for q in questions()[:4]]
    ours = transformers_side.continuation_logprobs(prompts, [CONTINUATIONS] * 4)
    theirs = vllm_side["continuation_logprobs"]
    for mine, other in zip(ours, theirs):
        assert other == pytest.approx(mine, abs=1e-3)
        assert max(range(len(mine)), key=mine.__getitem__) == max(range(len(other)), key=other.__getitem__)


@pytest.mark.skipif(
    not hasattr(evaluate, "loglik_rows"), reason="evaluation's gold-free loglik scoring is not in this checkout"
)
def test_loglik_evaluation_picks_the_same_answers(vllm_side, transformers_side, model, tmp_path):
    eval_config, generation = evaluation_configs("transformers")["loglik"]
    evaluate.evaluate_model(eval_config, generation, questions(), model, tmp_path, generator=transformers_side)
    ours = {
        json.loads(line)["id"]: json.loads(line)["output"]
        for line in (tmp_path / "outputs.jsonl").read_text().splitlines()
    }
    assert {row["id"]: row["output"] for row in vllm_side["evaluation"]["loglik"]["outputs"]} == ours


def test_distillation_with_the_vllm_backend(vllm_side, model, tmp_path):
    ours = distill(distill_config("transformers", str(model)), questions()[:4], tmp_path, seed=0, device="cpu")
    theirs, rerun = vllm_side["distill"]["stats"], vllm_side["distill"]["rerun"]
    assert theirs["teacher"]["backend"] == "vllm"
    assert set(theirs) == set(ours) and set(theirs["settings"]) == set(ours["settings"])
    assert theirs["questions"] == 4 and theirs["template_requests"] >= 4
    # The rerun resumes: every question finished before, nothing asked again.
    assert rerun["resumed_questions"] == 4 and rerun["trace_attempts"] == theirs["trace_attempts"]
    assert len(vllm_side["distill"]["sft"]) == theirs["accepted"]


def test_a_closed_generator_leaves_no_engine_process(vllm_side):
    """Engines stop when their generator is closed, not at interpreter exit: several engines left to the exit
    aborted a finished run once ("terminate called without an active exception", exit -6), and a stage that
    keeps its engine holds the GPU the next stage of the same process needs."""
    processes = vllm_side["engine_processes"]
    # The checks' own engine was found, so the two lists below mean something.
    assert "VLLM::EngineCore" in processes["own"], processes
    assert processes["teachers_alive"] == [], processes  # distill closed the engines of the two teachers it loaded
    assert processes["own_alive_after_close"] == [], processes
