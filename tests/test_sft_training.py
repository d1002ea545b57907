"""SFT on the tiny model, one process on CPU: LoRA and full fine-tuning learn, the saved models reload and
generate, the merged model is base + adapter, and an interrupted run resumed ends where an uninterrupted one does."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from medcritical.io.fingerprint import ResumeMismatch
from medcritical.io.manifest import read_manifest, verify_manifest
from medcritical.modeling.generation import TransformersGenerator
from medcritical.orchestration.recipe import load_recipe_text
from medcritical.orchestration.runner import finished_stats, with_recipe_value
from medcritical.training.config import SFTSection
from medcritical.training.sft import train_sft
from medcritical.training.stage import SFT
from tests.fixtures.sft import MAX_LENGTH, RESUME_TOLERANCE, short_questions, write_sft_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bundled):
    return write_sft_dataset(tmp_path_factory.mktemp("sft-data") / "traces.jsonl", short_questions(bundled, 64))


def sft_config(lora: bool, **trainer) -> SFTSection:
    settings = {"max_length": MAX_LENGTH, "per_device_train_batch_size": 4, "logging_steps": 2, "warmup_steps": 0.0}
    return SFTSection.model_validate(
        {"lora": {"enabled": lora, "r": 8, "alpha": 32}, "trainer": {**settings, **trainer}}
    )


FULL = dict(lora=False, learning_rate=3e-3, max_steps=16, save_steps=8)
LORA = dict(lora=True, learning_rate=1e-2, max_steps=16, save_steps=100)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, dataset, tiny_model):
    output = tmp_path_factory.mktemp("sft-full")
    return output, train_sft(sft_config(**FULL), dataset, tiny_model, output, device="cpu")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, dataset, tiny_model):
    output = tmp_path_factory.mktemp("sft-lora")
    return output, train_sft(sft_config(**LORA), dataset, tiny_model, output, device="cpu")


def _assert_learned_and_saved(output, metrics):
    assert metrics["steps"] == 16
    assert metrics["loss_last"] < metrics["loss_first"] - 0.1, metrics["loss_curve"]
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_gib"] > 0
    stored = json.loads((output / "sft_metrics.json").read_text())
    assert stored["loss_curve"] == metrics["loss_curve"]
    assert (output / "sft_loss.png").read_bytes().startswith(b"\x89PNG")
    assert verify_manifest(output) == []
    assert "model/model.safetensors" in {e.path for e in read_manifest(output)}
    # The final folder is a plain HF model with its tokenizer and chat template: it reloads and generates.
    generator = TransformersGenerator(output / "model", device="cpu", batch_size=2)
    assert generator.tokenizer.chat_template
    [[completion]] = generator.generate([[{"role": "user", "content": "题目：发热的原因"}]], max_new_tokens=8)
    assert completion.num_tokens > 0


def test_full_fine_tuning_reduces_the_loss(full_run):
    output, metrics = full_run
    assert not metrics["lora"] and metrics["adapter_dir"] is None
    _assert_learned_and_saved(output, metrics)


def test_lora_reduces_the_loss(lora_run):
    output, metrics = lora_run
    assert metrics["lora"] and metrics["merged"]
    _assert_learned_and_saved(output, metrics)


def test_merged_model_equals_base_plus_adapter(lora_run, tiny_model):
    from peft import PeftModel

    output, _ = lora_run
    merged = AutoModelForCausalLM.from_pretrained(output / "model").eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), output / "adapter"
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(ids).logits for m in (merged, with_adapter, base))
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapter is not a no-op


class Interrupted(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Stops the run abruptly at a step, as a killed pod would (no final save)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted


def test_interrupted_run_resumes_to_the_same_loss(tmp_path, full_run, dataset, tiny_model):
    _, uninterrupted = full_run
    output = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train_sft(sft_config(**FULL), dataset, tiny_model, output, device="cpu", callbacks=[InterruptAt(11)])
    assert (output / "checkpoints" / "checkpoint-8").is_dir() and not (output / "model").exists()

    resumed = train_sft(sft_config(**FULL), dataset, tiny_model, output, device="cpu")
    assert resumed["resumed_from"] == "checkpoint-8" and resumed["steps_this_session"] == 8
    after_resume = [p for p in resumed["loss_curve"] if p["step"] > 8]
    expected = [p for p in uninterrupted["loss_curve"] if p["step"] > 8]
    assert [p["step"] for p in after_resume] == [p["step"] for p in expected] == [10, 12, 14, 16]
    for got, want in zip(after_resume, expected):
        assert got["loss"] == pytest.approx(want["loss"], abs=RESUME_TOLERANCE)

    # The runner takes the finished run as finished (its metrics, no training); other settings in the same folder
    # are refused, naming the fix.
    recipe = with_recipe_value(load_recipe_text(""), "sft", sft_config(**FULL))
    stored = json.loads((output / "sft_metrics.json").read_text())
    assert finished_stats(SFT, recipe, str(output), {"distill": dataset, "model": tiny_model}, {}) == stored
    assert stored["steps_this_session"] == 8
    with pytest.raises(ResumeMismatch, match=r"\(settings\.trainer\.max_steps: 16 -> 20\)\. Rerun with --restart"):
        train_sft(sft_config(**{**FULL, "max_steps": 20}), dataset, tiny_model, output, device="cpu")
    # restart discards the checkpoints and the model: the new settings train from the start.
    other = sft_config(**{**FULL, "max_steps": 2, "save_steps": 100})
    restarted = train_sft(other, dataset, tiny_model, output, device="cpu", restart=True)
    assert restarted["resumed_from"] is None and restarted["steps_this_session"] == restarted["steps"] == 2
    assert not (output / "checkpoints" / "checkpoint-16").exists() and verify_manifest(output) == []


def test_packing_trains(tmp_path, dataset, tiny_model):
    config = sft_config(lora=False, learning_rate=3e-3, max_steps=4, save_steps=100, packing=True)
    metrics = train_sft(config, dataset, tiny_model, tmp_path, device="cpu")
    assert metrics["packing"] and metrics["steps"] == 4
    assert all(torch.isfinite(torch.tensor(p["loss"])) for p in metrics["loss_curve"])
