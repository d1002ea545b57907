"""What a model's own chat template and special tokens say about where an answer ends and what to pad with.

Real models disagree: SmolLM2 pads with its end-of-turn token (pad = EOS = ``<|im_end|>``); Qwen3 ends a turn
with ``<|im_end|>`` but its generation config also stops on ``<|endoftext|>``; a base model's EOS is its document
end while its chat template ends turns with another token. Training, generation and scoring read these facts
here, from the tokenizer and generation config the model ships, never from assumptions about one family.
"""

from __future__ import annotations

_PROBE = "ZQXJ probe answer"  # text that no template adds by itself, to find where the assistant turn ends
# Tokens a tokenizer may already have that serve as padding (no new token: that would resize the embeddings).
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<unk>")


def template_end_of_turn(tokenizer, template: str | None = None) -> int | None:
    """The first token the chat template writes after the assistant's text (``<|im_end|>`` for ChatML), or
    None when the template writes nothing after it."""
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    after = text[text.rindex(_PROBE) + len(_PROBE) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    return ids[0] if ids else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends a reply: the template's end of turn, the tokenizer's EOS and the generation
    config's EOS ids (Qwen3 lists two), in that order, without repeats."""
    ids = _ids(template_end_of_turn(tokenizer) if tokenizer.chat_template else None)
    ids += _ids(tokenizer.eos_token_id)
    ids += _ids(getattr(generation_config, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def distinct_pad_token(tokenizer, end_ids: list[int]) -> str | None:
    """A token to pad with that is none of `end_ids`: the tokenizer's pad when it is distinct, else its EOS or
    UNK, else a pad-like special token it already has; None when it has none."""
    vocab = tokenizer.get_vocab()
    for token in (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token, *PAD_CANDIDATES):
        if token and token in vocab and vocab[token] not in end_ids:
            return token
    return None


def starts_with_prompt(tokenizer, messages: list[dict], template: str | None = None) -> bool:
    """Whether the conversation without its last turn, rendered with the generation prompt, is a prefix of
    the whole conversation: then training on (prompt, completion) sees exactly what generation will."""
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True, chat_template=template
    )
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template).startswith(prompt)
