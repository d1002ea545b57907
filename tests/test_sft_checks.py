"""Pre-training checks of the SFT step: each bad input fails with its own clear error, before any training."""

import json
import shutil

import pytest

from medcritical.training.checks import PreTrainingCheckError
from medcritical.training.common import deepspeed_config_path, deepspeed_zero_stage, find_resumable_checkpoint
from medcritical.training.config import SFTSection
from medcritical.training.sft import train_sft
from tests.fixtures.sft import sft_row, write_sft_dataset

# Assistant turn closed outside the generation markers: its <|im_end|> would get no loss.
TEMPLATE_END_OUTSIDE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- generation %}{{- message['content'] }}{%- endgeneration %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bundled):
    return write_sft_dataset(tmp_path_factory.mktemp("sft-data") / "traces.jsonl", bundled[:20])


def _config(**trainer) -> SFTSection:
    return SFTSection.model_validate({"trainer": {"max_steps": 1, "max_length": 512, **trainer}})


def _model_copy(tiny_model, tmp_path, edit_tokenizer_config=None, template=None):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    if edit_tokenizer_config:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text())
        edit_tokenizer_config(config)
        path.write_text(json.dumps(config))
    return folder


def _expect_error(match, config, dataset, model, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(PreTrainingCheckError, match=match):
        train_sft(config, dataset, model, output, device="cpu")
    assert not (output / "checkpoints").exists()  # failed before training started


def test_dataset_without_assistant_turns(tmp_path, tiny_model, bundled):
    rows = [sft_row(q) for q in bundled[:3]]
    rows[1]["messages"] = rows[1]["messages"][:2]  # system + user only
    rows[2]["messages"][2]["content"] = "  "  # an empty answer is no answer
    path = tmp_path / "no-assistant.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    _expect_error(r"2 of 3 rows have no assistant turn \(lines 2, 3\)", _config(), path, tiny_model, tmp_path)


def test_all_sequences_longer_than_max_length(tmp_path, tiny_model, dataset):
    _expect_error(
        r"all 20 examples are longer than trainer.max_length=32", _config(max_length=32), dataset, tiny_model, tmp_path
    )


def test_tokenizer_without_chat_template(tmp_path, tiny_model, dataset):
    model = _model_copy(tiny_model, tmp_path, lambda c: c.pop("chat_template", None))
    (model / "chat_template.jinja").unlink()
    _expect_error("has no chat template", _config(), dataset, model, tmp_path)


def test_pad_equal_to_eos_pads_with_another_token_of_the_tokenizer(tmp_path, tiny_model):
    """pad = the end-of-turn token (as SmolLM2 ships): padding switches to a token the tokenizer already has."""
    from transformers import AutoTokenizer

    from medcritical.training.checks import check_tokenizer

    model = _model_copy(tiny_model, tmp_path, lambda c: c.update(pad_token="<|im_end|>"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    facts = check_tokenizer(tokenizer, str(model))
    assert facts.end_of_turn == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_end_of_turn_outside_the_loss(tmp_path, tiny_model, dataset):
    model = _model_copy(tiny_model, tmp_path, template=TEMPLATE_END_OUTSIDE)
    _expect_error("outside .* never learns to stop", _config(), dataset, model, tmp_path)


def test_template_without_generation_markers_trains_on_prompt_and_completion(tmp_path, tiny_model):
    """A template TRL cannot patch, whose prompt is a prefix of the conversation: (prompt, completion) rows."""
    from transformers import AutoTokenizer

    from medcritical.training.checks import check_tokenizer

    plain = TEMPLATE_END_OUTSIDE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    tokenizer = AutoTokenizer.from_pretrained(_model_copy(tiny_model, tmp_path, template=plain))
    facts = check_tokenizer(tokenizer, "plain ChatML")
    assert facts.prompt_completion and facts.training_template is None and facts.end_of_turn == "<|im_end|>"


def test_template_without_markers_whose_prompt_is_no_prefix(tmp_path, tiny_model, dataset):
    # The generation prompt opens a turn the conversation never writes: (prompt, completion) would not match.
    plain = TEMPLATE_END_OUTSIDE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    odd = plain.replace("{{- '<|im_start|>assistant\\n' }}{%- endif %}", "{{- '<|im_start|>model\\n' }}{%- endif %}")
    assert odd != plain
    model = _model_copy(tiny_model, tmp_path, template=odd)
    _expect_error("does not mark the assistant's text", _config(), dataset, model, tmp_path)


def test_qwen25_template_gets_trained_on_assistant_tokens(tmp_path, tiny_model):
    """The 7B student's own template has no generation markers: TRL's training version of it is used."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import qwen2_5_chat_template

    from medcritical.training.checks import check_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_copy(tiny_model, tmp_path, template=qwen2_5_chat_template))
    facts = check_tokenizer(tokenizer, "qwen2.5 template")
    assert facts.training_template and facts.end_of_turn == "<|im_end|>"
    messages = [{"role": "user", "content": "题目"}, {"role": "assistant", "content": "<think>x</think>\n答案：A"}]
    out = tokenizer.apply_chat_template(
        messages, chat_template=facts.training_template, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained.strip() == "<think>x</think>\n答案：A<|im_end|>"  # TRL's version also marks the newlines around


def test_deepspeed_configs_by_name():
    for name, stage in [("zero2", 2), ("zero3", 3), ("zero2_offload", 2), ("zero3_offload", 3)]:
        path = deepspeed_config_path(name)
        assert path.name == f"{name}.json"
        assert deepspeed_zero_stage(path) == stage
        offload = json.loads(path.read_text())["zero_optimization"].get("offload_optimizer")
        assert (offload is not None) == name.endswith("_offload")
    with pytest.raises(FileNotFoundError, match="zero2, zero3"):
        deepspeed_config_path("zero4")


def test_zero3_without_gathering_is_refused(tmp_path):
    config = json.loads(deepspeed_config_path("zero3").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        deepspeed_zero_stage(path)


def test_incomplete_checkpoint_is_not_resumed(tmp_path):
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    # checkpoint-10 has no trainer_state.json: the run died while saving it
    assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert find_resumable_checkpoint(tmp_path / "missing") is None


def test_the_tiny_model_folder_is_what_save_pretrained_writes(tiny_model, tmp_path):
    """build_tiny_model writes its files itself (save_pretrained writes nothing off global rank 0); what it
    writes must stay what save_pretrained would: vLLM picks the model class from config.json's architectures."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(tmp_path)
    ours, theirs = (json.loads((folder / "config.json").read_text()) for folder in (tiny_model, tmp_path))
    assert ours == theirs and ours["architectures"] == ["Qwen2ForCausalLM"]
    keys = [sorted(safe_open(folder / "model.safetensors", "pt").keys()) for folder in (tiny_model, tmp_path)]
    assert keys[0] == keys[1]
