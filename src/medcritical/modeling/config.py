"""The `model:` and `generation:` recipe sections: which model, and how the student generates."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from medcritical.section import Section

TINY = "tiny"  # model.base value: build the offline tiny model


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
        if value == TINY or value.startswith("s3://") or Path(value).is_dir():
            return value
        raise ValueError(f"no such model folder {value!r} (use 'tiny' or a local Hugging Face folder)")


class GenerationSection(Section):
    """How the student generates, in evaluation and rollout."""

    backend: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    # vLLM only: GPUs per model replica, and the share of GPU memory it may take.
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    # vLLM only: the context (prompt + reply tokens) vLLM reserves KV cache for. null: the model's own
    # (its config's max_position_embeddings: 32,768 for Qwen2.5-7B), far more than a CMExam prompt and
    # its reply need. `medcritical plan` sizes the GPU memory for this length.
    max_model_len: int | None = Field(None, ge=256)
