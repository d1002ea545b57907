"""The `model:` and `generation:` recipe sections: which model, and how the student generates."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from medcritical.core.section import Section, check_uri

TINY = "tiny"  # model.base value: build the offline tiny model

# Upper bounds of the numeric keys, shared by the sections (the real range, with room to spare):
MAX_TOKENS = 1_048_576  # no model's context is longer than a million tokens
MAX_GPUS = 1024  # GPUs one model replica or one step can span
MAX_TEMPERATURE = 2.0  # the OpenAI API's range, which vLLM and SGLang follow


class TinyModelSection(Section):
    # A test model: the caps keep a typo from building a model that fills memory.
    vocab_size: int = Field(
        2048, ge=512, le=65536
    )  # the byte-level BPE needs its 256 bytes, the special tokens and merges
    hidden_size: int = Field(64, ge=1, le=4096)
    num_layers: int = Field(2, ge=1, le=64)
    num_heads: int = Field(4, ge=1, le=64)
    intermediate_size: int = Field(256, ge=1, le=16384)
    seed: int = Field(0, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelSection:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads} (each head gets "
                "hidden_size / num_heads dimensions)"
            )
        return self


class ModelSection(Section):
    # "tiny" (built offline into the run folder) or a local Hugging Face model folder.
    base: str = TINY
    tiny: TinyModelSection = TinyModelSection()
    # "auto": bfloat16 on a GPU that supports it, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("base")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        if value == TINY:
            return value
        check_uri(value, "a model folder or 'tiny'")
        if value.startswith("s3://") or Path(value).is_dir():
            return value
        if Path(value).exists():
            raise ValueError(f"{value!r} is a file; give the model's folder (the one holding config.json) or 'tiny'")
        raise ValueError(f"no such model folder {value!r} (use 'tiny' or a local Hugging Face folder)")


class GenerationSection(Section):
    """How the student generates, in evaluation and rollout."""

    backend: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = Field(16, ge=1, le=65536)
    max_new_tokens: int = Field(256, ge=1, le=MAX_TOKENS)
    # vLLM only: GPUs per model replica, and the share of GPU memory it may take.
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_GPUS)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    # vLLM only: the context (prompt + reply tokens) vLLM reserves KV cache for. null: the model's own
    # (its config's max_position_embeddings: 32,768 for Qwen2.5-7B), far more than a CMExam prompt and
    # its reply need. `medcritical plan` sizes the GPU memory for this length.
    max_model_len: int | None = Field(None, ge=256, le=1_048_576)
