"""Checks run before training starts, so a bad input fails in seconds with a message, not hours later as a model
that cannot answer or never stops.

Tokenizer checks (`check_tokenizer`) are shared by SFT and DPO; conversation checks are for chat datasets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from medcritical.errors import InputError, MissingInputError
from medcritical.io.jsonl import read_input_jsonl
from medcritical.modeling.chat import distinct_pad_token, starts_with_prompt, template_end_of_turn

log = logging.getLogger(__name__)

_PROBE = "ZQXJ probe answer"  # text that no template adds by itself, to find where the assistant turn ends
_PROBE_CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _PROBE}]


class PreTrainingCheckError(InputError):
    """An input that would train a broken model; the message names the input, the problem and the fix."""


@dataclass(frozen=True)
class TokenizerFacts:
    # The template used to tokenize for training: the tokenizer's own when it marks assistant text with
    # {% generation %}, else TRL's training version of it (Qwen2.5, Qwen3, Llama 3, ...). The saved model keeps
    # the original template either way.
    training_template: str | None
    end_of_turn_id: int  # the token the model emits to end its answer
    end_of_turn: str
    # True when neither the template nor TRL marks the assistant's text (SmolLM2, Qwen3 templates other than
    # TRL's copy): SFT then trains on (prompt, completion) rows, the loss on the completion only.
    prompt_completion: bool = False


def check_tokenizer(tokenizer, source: str, *, assistant_only_loss: bool = True) -> TokenizerFacts:
    """A chat template exists, the end of an assistant turn is learnable, and padding cannot hide it."""
    if not tokenizer.chat_template:
        raise PreTrainingCheckError(
            f"{source}: the tokenizer has no chat template, so conversations cannot be formatted the way the model "
            "will be prompted; use an instruct/chat model (e.g. Qwen2.5-7B-Instruct) or add a chat_template.jinja "
            "to the model folder"
        )
    template = _training_template(tokenizer, source) if assistant_only_loss else None
    prompt_completion = template is _PROMPT_COMPLETION
    if prompt_completion:
        template = None
    end_id = _end_of_turn_id(tokenizer, template, source)
    end_token = tokenizer.convert_ids_to_tokens(end_id)
    if assistant_only_loss and not prompt_completion and not _end_of_turn_is_trained(tokenizer, template, end_id):
        raise PreTrainingCheckError(
            f"{source}: the chat template leaves the assistant's end-of-turn token {end_token!r} outside "
            "{% generation %}...{% endgeneration %}, so it gets no loss and the model never learns to stop; move it "
            "inside the markers in chat_template.jinja, or set sft.trainer.assistant_only_loss: false"
        )
    # TRL pads with eos when there is no pad token.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replacement = distinct_pad_token(tokenizer, [end_id]) if pad_id == end_id else None
    if replacement:
        # SmolLM2 ships pad = EOS = <|im_end|>: pad with a token the tokenizer already has (saved with the model).
        log.warning(
            "%s: the pad token is the end-of-turn token %r; padding with %r instead", source, end_token, replacement
        )
        tokenizer.pad_token = replacement
    elif pad_id == end_id:
        raise PreTrainingCheckError(
            f"{source}: the pad token is {end_token!r}, the token that ends an assistant turn (pad = EOS). Padding "
            "and the end of an answer are then indistinguishable: any collator or tool that masks padding by id "
            "drops every end-of-turn from the loss and the model never learns to stop. Set a distinct pad token in "
            'tokenizer_config.json (Qwen: "pad_token": "<|endoftext|>")'
        )
    return TokenizerFacts(template, end_id, end_token, prompt_completion)


_PROMPT_COMPLETION = "prompt-completion"  # _training_template's answer when SFT must split prompt and completion


def _training_template(tokenizer, source: str) -> str | None:
    if has_generation_markers(tokenizer.chat_template):
        return None  # the tokenizer's own template already marks the assistant's text
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        if starts_with_prompt(tokenizer, _PROBE_CHAT):
            return _PROMPT_COMPLETION
        raise PreTrainingCheckError(
            f"{source}: the chat template does not mark the assistant's text with {{% generation %}} ... "
            "{% endgeneration %} and TRL has no training version of it, so the loss cannot be limited to the "
            "assistant's tokens; add the markers in chat_template.jinja, or set sft.trainer.assistant_only_loss: false "
            "(loss on the prompt too)"
        ) from None


def _end_of_turn_id(tokenizer, template: str | None, source: str) -> int:
    """The first token the template writes after the assistant's text (<|im_end|> for ChatML)."""
    end_id = template_end_of_turn(tokenizer, template)
    if end_id is None:
        # Nothing follows the answer: the model would end on its document EOS.
        if tokenizer.eos_token_id is None:
            raise PreTrainingCheckError(
                f"{source}: the chat template writes nothing after the assistant's answer and the tokenizer has no "
                "EOS token, so the model cannot learn to stop; use a chat template that ends turns with a token"
            )
        return tokenizer.eos_token_id
    return end_id


def _end_of_turn_is_trained(tokenizer, template: str | None, end_id: int) -> bool:
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": _PROBE},
        {"role": "user", "content": "again"},
    ]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
    )
    trained = [token for token, mask in zip(out["input_ids"], out["assistant_masks"]) if mask]
    return end_id in trained


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The "messages" of each JSONL row (other keys are metadata and ignored), checked for an assistant turn."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: no such dataset file (the distill step writes it)")
    conversations, bad_lines = [], []
    for number, row in read_input_jsonl(path, "SFT dataset"):  # UTF-8, one object per line, 1-based lines
        messages = row.get("messages")
        if not _has_assistant_answer(messages):
            bad_lines.append(number)
            continue
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:5])) + (" ..." if len(bad_lines) > 5 else "")
        raise PreTrainingCheckError(
            f"{path}: {len(bad_lines)} of {len(bad_lines) + len(conversations)} rows have no assistant turn "
            f'(lines {shown}); SFT learns only from the assistant\'s text. Each row needs "messages": '
            "[{role: user, content: ...}, {role: assistant, content: ...}]; remove those rows or rerun distill"
        )
    if not conversations:
        raise PreTrainingCheckError(f"{path}: the dataset is empty; nothing to train on")
    return conversations


def _has_assistant_answer(messages) -> bool:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        return False
    return any(
        isinstance(m, dict) and m.get("role") == "assistant" and str(m.get("content") or "").strip() for m in messages
    )


def conversation_lengths(tokenizer, conversations: list[list[dict]], template: str | None = None) -> list[int]:
    """Token counts of each conversation as the trainer will tokenize it."""
    ids = tokenizer.apply_chat_template(conversations, tokenize=True, chat_template=template, return_dict=False)
    return [len(x) for x in ids]


def select_by_length(
    conversations: list[list[dict]], lengths: list[int], max_length: int, on_too_long: str, source: str
) -> tuple[list[list[dict]], dict[str, int]]:
    """Drop (or keep, to be truncated) conversations longer than max_length; all too long is an error."""
    too_long = sum(length > max_length for length in lengths)
    if too_long == len(conversations):
        raise PreTrainingCheckError(
            f"{source}: all {too_long} examples are longer than trainer.max_length={max_length} tokens (shortest "
            f"{min(lengths)}); raise sft.trainer.max_length, or shorten the traces (distill max tokens)"
        )
    if too_long:
        log.warning(
            "%d of %d examples are longer than max_length=%d tokens: %s (sft.on_too_long)",
            too_long,
            len(conversations),
            max_length,
            "dropped" if on_too_long == "drop" else "truncated, their answers cut off",
        )
    if on_too_long == "drop":
        kept = [c for c, length in zip(conversations, lengths) if length <= max_length]
        return kept, {"examples": len(kept), "dropped_too_long": too_long, "truncated": 0}
    return conversations, {"examples": len(conversations), "dropped_too_long": 0, "truncated": too_long}
