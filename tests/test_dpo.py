"""DPO with TRL on real self-play pairs of the tiny scripted model: margin, reference, resume, no pairs."""

import copy
import inspect
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from medcritical.io.fingerprint import ResumeMismatch
from medcritical.io.manifest import verify_manifest
from medcritical.modeling.config import GenerationSection
from medcritical.orchestration.recipe import load_recipe_text
from medcritical.orchestration.runner import finished_stats, with_recipe_value
from medcritical.selfplay.config import CorrectionSection, PairsSection, RolloutSection, SelfPlaySection
from medcritical.selfplay.run import run_rollout
from medcritical.selfplay.stage import DPO, _not_measured, write_rounds
from medcritical.training.config import DPOSection, LoraSection
from medcritical.training.dpo import build_dpo_trainer, dpo_arguments, train_dpo
from medcritical.training.dpo_data import drop_too_long, read_pairs, split_heldout

pytestmark = pytest.mark.slow  # end-to-end: left out of the quick lane (README, Tests)

TRAINER = dict(
    per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=384, logging_steps=2, save_steps=2
)


@pytest.fixture(scope="module")
def pairs_dir(format_model, selfplay_questions, tmp_path_factory):
    """pairs.jsonl / pairs_heldout.jsonl from a real rollout + self-correction of the format model."""
    output = tmp_path_factory.mktemp("rollout")
    config = SelfPlaySection(
        rollout=RolloutSection(samples_per_question=4, temperature=1.0, top_p=1.0, max_new_tokens=48),
        correction=CorrectionSection(attempts=2, temperature=1.0),
        pairs=PairsSection(heldout_fraction=0.2, max_pairs_per_question=4),
    )
    stats = run_rollout(config, GenerationSection(), selfplay_questions, format_model, output, device="cpu")
    # The scripted model corrects the 10 questions whose gold is B (4 wrong samples each, tests/fixtures/selfplay.py).
    assert stats["pairs"]["train_pairs"] >= 20 and stats["pairs"]["heldout_pairs"] >= 4
    return output


def completion_logps(model, tokenizer, pairs, side):
    """Sum of log-probs of each pair's completion tokens after its prompt: computed here, not by TRL."""
    values = []
    for pair in pairs:
        prompt = tokenizer.apply_chat_template(
            pair["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0, :-1].float().log_softmax(-1)
        targets = torch.tensor(full[1:])
        values.append(logits.gather(1, targets[:, None])[len(prompt) - 1 :].sum().item())
    return torch.tensor(values)


def reward_margin(policy, reference, tokenizer, pairs, beta):
    chosen = completion_logps(policy, tokenizer, pairs, "chosen") - completion_logps(
        reference, tokenizer, pairs, "chosen"
    )
    rejected = completion_logps(policy, tokenizer, pairs, "rejected") - completion_logps(
        reference, tokenizer, pairs, "rejected"
    )
    return (beta * (chosen - rejected)).mean().item()


def test_lora_dpo_raises_the_heldout_margin(pairs_dir, format_model, tmp_path):
    config = DPOSection(
        lora=LoraSection(r=8, alpha=16, dropout=0.0),
        # The held-out margin is a mean over pairs (even evaluation batches), as the check below measures it.
        trainer=dict(learning_rate=5e-3, num_train_epochs=3, **TRAINER),
        evaluations=6,
    )
    output = tmp_path / "dpo"
    metrics = train_dpo(
        config, pairs_dir / "pairs.jsonl", pairs_dir / "pairs_heldout.jsonl", format_model, output, device="cpu"
    )

    held = metrics["heldout"]
    assert metrics["status"] == "trained" and metrics["reference"] == "the policy with its LoRA adapter disabled"
    assert held["initial_margin"] == pytest.approx(0.0, abs=1e-4)  # the reference is the starting model
    # The checkpoint is picked on the selection half (best margin restored) ...
    assert held["selection"]["margin"] > 0.05 and held["selection"]["margin"] == pytest.approx(held["best_margin"])
    assert metrics["kept"]["model"] == metrics["restored_best"] and metrics["kept"]["step"] == held["best_step"]
    assert "restore_best" in metrics["kept"]["why"] and metrics["kept"]["training_loss"] is not None
    # ... and reported on the other half, which played no part in picking it.
    assert held["measured_on"].startswith("the reporting half") and metrics["reporting_pairs"] > 0
    assert held["margin"] > 0.0 and held["margin"] != pytest.approx(held["selection"]["margin"])
    assert metrics["loss_first"] == pytest.approx(math.log(2), abs=1e-3) and metrics["loss_last"] < math.log(2)

    # The saved model is a full HF folder, and its margin over the starting model, measured here
    # independently of TRL on the reporting half, is the held-out margin the run reported.
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    trained = AutoModelForCausalLM.from_pretrained(output / "model")
    start = AutoModelForCausalLM.from_pretrained(format_model)
    heldout, _ = drop_too_long(read_pairs(pairs_dir / "pairs_heldout.jsonl"), tokenizer, TRAINER["max_length"])
    selection, reporting = split_heldout(heldout, seed=0)
    assert len(reporting) == metrics["reporting_pairs"] and len(selection) + len(reporting) == metrics["heldout_pairs"]
    assert reward_margin(trained, start, tokenizer, reporting, config.settings["beta"]) == pytest.approx(
        held["margin"], abs=2e-3
    )
    assert all(not verify_manifest(output) for _ in [0])
    for name in ("dpo_metrics.json", "dpo_loss.png", "dpo_heldout.png"):
        assert (output / name).is_file()
    # The runner finds the finished run and returns its metrics without training again.
    paths = {"rollout": pairs_dir / "pairs.jsonl", "heldout": pairs_dir / "pairs_heldout.jsonl", "model": format_model}
    assert finished_stats(DPO, dpo_recipe(config), str(output), paths, {}) is None  # the stage's last file missing
    train_pass = _train_pass_as_the_stage_writes_it(output)
    assert finished_stats(DPO, dpo_recipe(config), str(output), paths, {}) == json.loads(
        (output / "dpo_metrics.json").read_text()
    ) | {"train_pass": train_pass}


@pytest.mark.parametrize(
    "precompute, loss",
    [
        (False, {"loss_type": ["sigmoid"]}),
        (True, {"loss_type": ["ipo"]}),
        (False, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}),
    ],
    ids=["copy", "precompute-ipo", "copy-sigmoid_sft"],
)
def test_full_finetune_reference_is_the_model_in_memory(pairs_dir, format_model, tmp_path, precompute, loss):
    """The SFT model in memory differs from the folder it was loaded from (as after training in the same
    process); the reference must be the in-memory one, and stay fixed while the policy trains."""
    tokenizer = AutoTokenizer.from_pretrained(format_model)
    policy = AutoModelForCausalLM.from_pretrained(format_model)
    with torch.no_grad():
        policy.model.norm.weight.mul_(1.5)  # in memory only; TRL 1.16 would reload the folder's weights
    snapshot, on_disk = copy.deepcopy(policy), AutoModelForCausalLM.from_pretrained(format_model)
    pairs = read_pairs(pairs_dir / "pairs.jsonl")[:8]
    config = DPOSection(
        lora=LoraSection(enabled=False),
        trainer=dict(
            precompute_ref_log_probs=precompute, learning_rate=1e-3, max_steps=3, warmup_steps=0.0, **loss, **TRAINER
        ),
    )
    args = dpo_arguments(config, tmp_path, device="cpu", seed=0, deepspeed=None, heldout=False)
    trainer = build_dpo_trainer(config, policy, tokenizer, pairs, [], args, model_path=format_model)

    expected = completion_logps(snapshot, tokenizer, pairs, "chosen")
    assert not torch.allclose(expected, completion_logps(on_disk, tokenizer, pairs, "chosen"), atol=1e-2)

    def reference_chosen_logps():
        if precompute:
            return torch.tensor(trainer.train_dataset["ref_chosen_logps"])
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
        return trainer.compute_ref_log_probs(trainer.ref_model, batch)[0]

    assert torch.allclose(reference_chosen_logps(), expected, atol=1e-3)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] != pytest.approx(losses[0], abs=1e-4)  # the policy moves: not stuck at the start value
    assert not torch.allclose(completion_logps(policy, tokenizer, pairs, "chosen"), expected, atol=1e-3)
    assert torch.allclose(reference_chosen_logps(), expected, atol=1e-3)  # while the reference stays put


class InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_dpo_resumes_from_its_last_checkpoint(pairs_dir, format_model, tmp_path):
    config = DPOSection(
        lora=LoraSection(r=4, alpha=8, dropout=0.0), trainer=dict(learning_rate=1e-3, max_steps=4, **TRAINER)
    )
    with pytest.raises(KeyboardInterrupt):
        train_dpo(
            config, pairs_dir / "pairs.jsonl", None, format_model, tmp_path, device="cpu", callbacks=[InterruptAt(3)]
        )
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "model").exists()
    metrics = train_dpo(config, pairs_dir / "pairs.jsonl", None, format_model, tmp_path, device="cpu")
    assert metrics["resumed_from"] == "checkpoint-2" and metrics["steps"] == 4 and metrics["steps_this_session"] == 2
    assert metrics["heldout"] is None and (tmp_path / "model" / "config.json").is_file()

    # The runner takes the same run again as finished and returns its result, also from a copy of the same
    # weights elsewhere (the weights count, not the path); other weights or settings are refused; restart trains
    # them from the start.
    def finished(model):
        paths = {"rollout": pairs_dir / "pairs.jsonl", "heldout": None, "model": model}
        return finished_stats(DPO, dpo_recipe(config), str(tmp_path), paths, {})

    metrics = metrics | {"train_pass": _train_pass_as_the_stage_writes_it(tmp_path)}
    assert finished(format_model) == metrics
    moved = shutil.copytree(format_model, tmp_path.parent / f"{tmp_path.name}-model")
    assert finished(moved) == metrics
    weights = next(moved.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ResumeMismatch, match=r"\(model: "):
        train_dpo(config, pairs_dir / "pairs.jsonl", None, moved, tmp_path, device="cpu")
    other = config.model_copy(update={"trainer": config.trainer | {"beta": 0.1}})
    with pytest.raises(ResumeMismatch, match=r"\(settings\.trainer\.beta: \(none\) -> 0\.1\)\. Rerun with --restart"):
        train_dpo(other, pairs_dir / "pairs.jsonl", None, format_model, tmp_path, device="cpu")
    restarted = train_dpo(other, pairs_dir / "pairs.jsonl", None, format_model, tmp_path, device="cpu", restart=True)
    assert restarted["resumed_from"] is None and restarted["steps_this_session"] == 4 and restarted["beta"] == 0.1


def test_dpo_resume_is_a_recipe_key_as_for_sft(pairs_dir, format_model, tmp_path):
    """selfplay.dpo.resume, on by default like sft.resume, is what the trainer reads (no argument of its own)."""
    assert load_recipe_text("").selfplay.dpo.resume is True
    assert load_recipe_text("selfplay: {dpo: {resume: false}}").selfplay.dpo.resume is False
    assert "resume" not in inspect.signature(train_dpo).parameters
    config = DPOSection(
        lora=LoraSection(r=4, alpha=8, dropout=0.0),
        trainer=dict(learning_rate=1e-3, max_steps=4, **TRAINER),
        resume=False,
    )
    with pytest.raises(KeyboardInterrupt):
        train_dpo(
            config, pairs_dir / "pairs.jsonl", None, format_model, tmp_path, device="cpu", callbacks=[InterruptAt(3)]
        )
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    metrics = train_dpo(config, pairs_dir / "pairs.jsonl", None, format_model, tmp_path, device="cpu")
    assert metrics["resumed_from"] is None and metrics["steps_this_session"] == 4  # from the start


def dpo_recipe(config: DPOSection):
    """A recipe whose selfplay.dpo section is `config`."""
    return with_recipe_value(load_recipe_text(""), "selfplay.dpo", config)


def test_no_pairs_is_an_explicit_result_not_a_crash(format_model, tmp_path):
    (tmp_path / "pairs.jsonl").write_text("")
    metrics = train_dpo(DPOSection(), tmp_path / "pairs.jsonl", None, format_model, tmp_path / "dpo", device="cpu")
    assert metrics["status"] == "skipped" and "no training pairs" in metrics["reason"]
    assert metrics["model"] == str(format_model)  # unchanged: the next step uses the input model
    assert json.loads((tmp_path / "dpo" / "dpo_metrics.json").read_text()) == metrics


def test_bad_pairs_file_names_row_and_fix(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "text", "chosen": [], "rejected": []}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: prompt, chosen, rejected must be a non-empty list of chat messages"):
        read_pairs(tmp_path / "pairs.jsonl")


def test_pairs_that_prefer_nothing_or_hold_no_text_are_refused_by_line(tmp_path):
    user, answer = [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "答案：A"}]
    good = {"prompt": user, "chosen": answer, "rejected": [{"role": "assistant", "content": "答案：B"}]}
    rows = [good, {"prompt": user, "chosen": answer, "rejected": answer}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"line 2: chosen and rejected are the same conversation"):
        read_pairs(tmp_path / "pairs.jsonl")
    rows[1] = good | {"chosen": [{"role": "assistant", "content": 5}]}
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"line 2: chosen must be a non-empty list of chat messages"):
        read_pairs(tmp_path / "pairs.jsonl")


def test_best_margin_before_training_is_reported_not_hidden():
    from medcritical.training.dpo import _warnings

    warned = _warnings([], DPOSection(), best_step=0, restored="checkpoint-3")
    assert len(warned) == 1 and "best before training" in warned[0] and "checkpoint-3" in warned[0]
    assert _warnings([], DPOSection(), best_step=3, restored="checkpoint-3") == []


def test_heldout_pairs_split_by_whole_question_into_selection_and_reporting():
    """Issue 24: the best checkpoint was picked by held-out margin and then reported on the same pairs.
    The held-out pairs now split, by question, into a half that picks and a half that reports."""
    pairs = [
        {"prompt": [{"role": "user", "content": f"q{q}"}], "chosen": [], "rejected": [], "n": n}
        for q in range(10)
        for n in range(q % 3 + 1)
    ]
    selection, reporting = split_heldout(pairs, seed=0)
    prompts = [{p["prompt"][0]["content"] for p in half} for half in (selection, reporting)]
    assert prompts[0].isdisjoint(prompts[1]) and len(prompts[0]) == len(prompts[1]) == 5
    assert len(selection) + len(reporting) == len(pairs)
    assert (
        split_heldout(list(reversed(pairs)), seed=0)[1] != []
        and {p["prompt"][0]["content"] for p in split_heldout(list(reversed(pairs)), seed=0)[1]} == prompts[1]
    )
    assert split_heldout(pairs[:1], seed=0) == (pairs[:1], [])  # one question: nothing left to report on


def _train_pass_as_the_stage_writes_it(folder) -> dict:
    """The DPO stage writes train_pass.json, measured or not, then rounds.json last; train_dpo alone (called here)
    writes neither. Returns the train_pass statistics."""
    train_pass = _not_measured(folder, "not measured in this test", turned_off=True)
    write_rounds(folder, previous_rounds=None, rollout_stats=None)
    return train_pass
