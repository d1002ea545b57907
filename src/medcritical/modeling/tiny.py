"""A tiny Qwen2-style model and byte-level BPE tokenizer, built offline and deterministically.

For tests and the CPU demo: no hub download, seconds to build, and the same chat format as the real
students (ChatML with ``{% generation %}`` markers so TRL can train on assistant tokens only).
Pad is ``<|endoftext|>``, not EOS (``<|im_end|>``): a pad equal to EOS gets masked out of the loss
and the model never learns to stop.
"""

from __future__ import annotations

import json
from pathlib import Path

from medcritical.data.bundled import bundled_questions
from medcritical.modeling.config import TinyModelSection

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK_TOKENS = ["<think>", "</think>"]

# ChatML, as Qwen2.5 uses it, with generation markers around what the assistant writes.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _training_text(questions) -> list[str]:
    """Text the tokenizer learns merges from: the questions, options, explanations and answer cues."""
    lines = ["答案：A B C D E", "<think>", "</think>", "Answer: the answer is A B C D E"]
    for q in questions:
        lines.append(q.question)
        lines.extend(f"{letter} {text}" for letter, text in q.options.items())
        lines.append(q.explanation)
    return lines


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(bundled_questions()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=4096,
        padding_side="left",
    )
    fast.add_tokens(THINK_TOKENS)  # normal tokens: they must survive decoding
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(output_dir: str | Path, config: TinyModelSection = TinyModelSection()) -> Path:
    """Write a tiny random-initialised Qwen2 model + tokenizer to `output_dir` (a HF folder)."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(config.vocab_size)
    torch.manual_seed(config.seed)
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(model_config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # Written file by file: under torch.distributed transformers' save_pretrained writes nothing on a rank other
    # than 0, and each node of a multi-node job builds its own copy (its own disk), so the second node's folder
    # had a tokenizer and no weights. Tied embeddings are stored once, under the name save_pretrained uses.
    output_dir.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # what save_pretrained records: vLLM picks the class by it
    model.config.dtype = torch.float32
    model.config.save_pretrained(output_dir)
    model.generation_config.save_pretrained(output_dir)
    tied = model_config.tie_word_embeddings
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, output_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(output_dir)
    (output_dir / "medcritical_tiny.json").write_text(json.dumps(config.model_dump(), indent=2))
    return output_dir


def ensure_tiny_model(output_dir: str | Path, config: TinyModelSection = TinyModelSection()) -> Path:
    """Build the tiny model unless `output_dir` already holds one built with the same settings."""
    output_dir = Path(output_dir)
    marker = output_dir / "medcritical_tiny.json"
    built = all((output_dir / name).is_file() for name in ("config.json", "model.safetensors"))
    if built and marker.is_file() and json.loads(marker.read_text()) == config.model_dump():
        return output_dir
    return build_tiny_model(output_dir, config)
