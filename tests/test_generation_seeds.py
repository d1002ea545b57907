"""Seeds: a sample depends on (run seed, prompt key, sample index) only, never on its batch, so a run
split by a crash and resumed samples exactly as an uninterrupted one (transformers backend, tiny model;
the vLLM backend's same check is in test_vllm_backend.py)."""

import math

import pytest
import torch

from medcritical.distill.teachers import LocalModelTeacher, TeacherRequest
from medcritical.modeling.generation import KeyedSampler, TransformersGenerator, sample_seed
from medcritical.prompts import mcq_messages
from medcritical.selfplay.config import CorrectionSection, RolloutSection
from medcritical.selfplay.correction import correct_trajectories
from medcritical.selfplay.rollout import rollout_questions

SAMPLING = dict(n=3, temperature=1.0, top_p=0.95, max_new_tokens=12)


@pytest.fixture(scope="module")
def generator(tiny_model):
    return TransformersGenerator(tiny_model, device="cpu", batch_size=16)


def texts(completions):
    return [[c.text for c in samples] for samples in completions]


def test_sample_seed_depends_on_seed_key_and_index_only():
    assert sample_seed(0, "q1", 0) == sample_seed(0, "q1", 0)
    assert (
        len({sample_seed(0, "q1", 0), sample_seed(1, "q1", 0), sample_seed(0, "q2", 0), sample_seed(0, "q1", 1)}) == 4
    )
    assert 0 <= sample_seed(12345, "题目", 7) < 2**63


def test_keyed_sampler_draws_from_the_softmax():
    # Two tokens with probabilities 1/3 and 2/3; 3,000 rows with their own seeds.
    rows = 3000
    sampler = KeyedSampler(list(range(rows)), temperature=1.0, top_p=1.0, prompt_width=0, max_new_tokens=1)
    scores = torch.tensor([[0.0, math.log(2.0)]]).repeat(rows, 1)
    out = sampler(torch.zeros(rows, 0, dtype=torch.long), scores)
    chosen = out.argmax(-1)
    assert torch.isinf(out).sum() == rows  # exactly one token left per row
    share = chosen.float().mean().item()
    assert abs(share - 2 / 3) < 0.03, share  # 3 standard errors of 0.0086
    # top_p keeps the most likely tokens up to that mass: 0.5 < 2/3 leaves only token 1.
    nucleus = KeyedSampler(list(range(rows)), temperature=1.0, top_p=0.5, prompt_width=0, max_new_tokens=1)
    assert nucleus(torch.zeros(rows, 0, dtype=torch.long), scores).argmax(-1).eq(1).all()


def test_samples_do_not_depend_on_batch_size_order_or_neighbours(generator, bundled):
    prompts = [mcq_messages(q) for q in bundled[:6]]
    keys = [q.id for q in bundled[:6]]
    together = texts(generator.generate(prompts, keys=keys, seed=3, **SAMPLING))
    assert len({t for samples in together for t in samples}) > 6, "samples of a prompt differ from each other"

    small = TransformersGenerator.from_model(generator.model, generator.tokenizer, batch_size=2)
    reversed_ = texts(small.generate(prompts[::-1], keys=keys[::-1], seed=3, **SAMPLING))[::-1]
    alone = [texts(small.generate([p], keys=[k], seed=3, **SAMPLING))[0] for p, k in zip(prompts[:2], keys[:2])]
    generator.batch_size = 16
    assert reversed_ == together
    assert alone == together[:2]

    other_seed = texts(generator.generate(prompts, keys=keys, seed=4, **SAMPLING))
    assert other_seed != together
    # Without keys, the prompt's content is the key: still independent of the batch.
    assert (
        texts(generator.generate(prompts[:3], seed=3, **SAMPLING))
        == texts(small.generate(prompts[2::-1], seed=3, **SAMPLING))[::-1]
    )


def test_a_split_rollout_and_correction_sample_like_an_uninterrupted_one(generator, bundled, tmp_path):
    questions = bundled[:5]
    config = RolloutSection(samples_per_question=2, temperature=1.0, max_new_tokens=12, chunk_size=5)
    whole = rollout_questions(generator, questions, config, tmp_path / "whole.jsonl", seed=7)
    # The "crashed" run finished only the last two questions (another order, other chunks); the rerun
    # does the rest in chunks of two.
    split_path = tmp_path / "split.jsonl"
    rollout_questions(generator, questions[3:], config.model_copy(update={"chunk_size": 1}), split_path, seed=7)
    split = rollout_questions(generator, questions, config.model_copy(update={"chunk_size": 2}), split_path, seed=7)
    assert [(r["question_id"], r["sample"], r["trajectory"]) for r in split] == [
        (r["question_id"], r["sample"], r["trajectory"]) for r in whole
    ]

    by_id = {q.id: q for q in questions}
    correction = CorrectionSection(attempts=2, temperature=1.0)
    kwargs = dict(max_new_tokens=12, seed=7)
    one_chunk = correct_trajectories(
        generator, by_id, whole, correction, tmp_path / "c1.jsonl", chunk_size=10, **kwargs
    )
    half = correct_trajectories(generator, by_id, whole[5:], correction, tmp_path / "c2.jsonl", chunk_size=3, **kwargs)
    resumed = correct_trajectories(generator, by_id, whole, correction, tmp_path / "c2.jsonl", chunk_size=3, **kwargs)
    assert resumed[5:] == half
    assert [r["attempts"] for r in resumed] == [r["attempts"] for r in one_chunk]


def test_local_teacher_samples_do_not_depend_on_its_batches(generator, bundled):
    requests = [TeacherRequest(q, "trace", 1, mcq_messages(q)) for q in bundled[:4]]

    def replies(batch_size):
        got = {}
        teacher = LocalModelTeacher(
            generator, name="tiny", backend="transformers", temperature=1.0, top_p=1.0, batch_size=batch_size
        )
        teacher.complete(
            requests, max_new_tokens=10, seed=11, on_reply=lambda r, reply: got.update({r.question.id: reply.content})
        )
        return got

    assert replies(4) == replies(3)
