"""The `model:` and `generation:` recipe sections: which model, and how the student generates."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from medcritical.section import Section

TINY = "tiny"  # model.base value: build the offline tiny model


class TinyModelConfig(Section):
    vocab_size: int = 2048
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    seed: int = 0


class ModelConfig(Section):
    # "tiny" (built offline into the run folder) or a local Hugging Face model folder.
    base: str = TINY
    tiny: TinyModelConfig = TinyModelConfig()
    # "auto": bfloat16 on a GPU that supports it, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("base")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        if value == TINY or value.startswith("s3://") or Path(value).is_dir():
            return value
        raise ValueError(f"no such model folder {value!r} (use 'tiny' or a local Hugging Face folder)")


class GenerationConfig(Section):
    """How the student generates, in evaluation and rollout."""

    backend: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = 16
    max_new_tokens: int = 256
    # vLLM only: GPUs per model replica, and the share of GPU memory it may take.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
