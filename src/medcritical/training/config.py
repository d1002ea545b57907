"""Recipe sections of the training steps. LoraSection and OptimSection are shared by SFT and DPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medcritical.section import Section


class LoraSection(Section):
    enabled: bool = True
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" or a list of module names (Qwen2: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    target_modules: str | list[str] = "all-linear"
    # Save full weights with the adapter merged in (what rollout/vLLM load); the adapter is kept too.
    merge: bool = True


class OptimSection(Section):
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)  # share of the total steps
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)  # > 0 overrides epochs
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=16)  # in tokens; a chat template alone takes about a dozen
    gradient_checkpointing: bool = False
    # A DeepSpeed config: a bare name (zero2, zero3, zero2_offload, zero3_offload: recipes/deepspeed/<name>.json)
    # or a path to a .json file. None trains without DeepSpeed (one process, or plain DDP under torchrun).
    deepspeed: str | None = None
    # A torch optimizer name as transformers spells it. A torch optimizer also under DeepSpeed (no compiled op to
    # build); the *_offload DeepSpeed configs name their own (DeepSpeed's CPU Adam) and override this.
    optimizer: str = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(10, ge=1)

    @field_validator("max_steps")
    @classmethod
    def _steps_or_off(cls, value: int) -> int:
        if value == 0:
            raise ValueError("max_steps 0 would train nothing: give a number of steps > 0, or -1 to train for `epochs`")
        return value


class SFTSection(Section):
    lora: LoraSection = LoraSection()
    optim: OptimSection = OptimSection()
    # Pack several short examples into one max_length sequence (faster; needs a flash-attention-capable setup on GPU).
    packing: bool = False
    # Loss on the assistant's tokens only (the teacher's reasoning and answer), not on the prompt.
    assistant_only_loss: bool = True
    # Examples longer than optim.max_length: "drop" them (counted in the metrics), or "truncate" them, which cuts
    # off the answer and its end-of-turn token and so teaches the model to ramble on without ending.
    on_too_long: Literal["drop", "truncate"] = "drop"
    # A rerun with the same output folder continues from the newest complete checkpoint.
    resume: bool = True
