"""The paper recipe carries the paper's settings; the improved one departs only where it says so."""

from pathlib import Path

import yaml

from medcritical.recipe import load_recipe
from medcritical.selfplay.config import PairsSection
from medcritical.selfplay.pairs import build_preference_pairs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_paper_recipe_is_the_papers():
    r = load_recipe(RECIPES / "paper-7b-lora.yaml")
    assert r.data.eval_source and r.data.eval_size is None  # the full test split, no sampling
    dpo, trl = r.selfplay.dpo, r.selfplay.dpo.settings
    assert (trl["beta"], trl["learning_rate"], trl["num_train_epochs"], trl["max_length"]) == (0.3, 1e-5, 10, 2048)
    assert trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"] == 32  # x GPUs (1)
    assert dpo.early_stopping_patience == 0 and not dpo.restore_best
    assert r.selfplay.pairs.max_pairs == 1000 and not r.selfplay.pairs.use_correct_samples
    assert (dpo.lora.r, r.sft.lora.r) == (8, 8)


def test_improved_recipe_comments_every_departure():
    paper = yaml.safe_load((RECIPES / "paper-7b-lora.yaml").read_text())
    improved_text = (RECIPES / "paper-7b-improved.yaml").read_text()
    improved = yaml.safe_load(improved_text)
    load_recipe(RECIPES / "paper-7b-improved.yaml")

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    paper_values = dict(leaves(paper))
    departures = [k for k, v in leaves(improved) if paper_values.get(k, object()) != v and not k.startswith("run.")]
    assert len(departures) >= 8
    lines = improved_text.splitlines()
    for key in departures:
        leaf = key.rsplit(".", 1)[-1]
        assert any(line.strip().startswith(f"{leaf}:") and "departs:" in line for line in lines), key


def test_max_pairs_keeps_a_seeded_subset(bundled):
    from medcritical.grader import grade_answer

    questions = [q for q in bundled if not q.is_multi_answer][:30]
    rollouts, corrections = [], []
    for q in questions:
        wrong = next(letter for letter in q.options if letter != q.answer)
        for n, letter in enumerate((wrong, q.answer)):
            text = f"<think>{n}</think>\n答案：{letter}"
            grade = grade_answer(text, q.answer, q.options)
            rollouts.append(
                {
                    "question_id": q.id,
                    "sample": n,
                    "trajectory": text,
                    "predicted": grade.predicted,
                    "gold": q.answer,
                    "correct": grade.correct,
                    "num_tokens": 10,
                }
            )
    config = PairsSection(max_pairs=12, heldout_fraction=0.0)
    train, _, stats = build_preference_pairs(questions, rollouts, corrections, config, seed=1)
    again, _, _ = build_preference_pairs(questions, list(reversed(rollouts)), corrections, config, seed=1)
    assert len(train) == 12 and stats["dropped"]["over_max_pairs"] == 18
    assert sorted(p["question_id"] for p in train) == sorted(p["question_id"] for p in again)
