"""Recipe sections shared by SFT and DPO: LoRA and the optimisation schedule."""

from __future__ import annotations

from typing import Literal

from medcritical.section import Section


class LoraSection(Section):
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # "all-linear" or a list of module names (Qwen2: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    target_modules: str | list[str] = "all-linear"
    # Save full weights with the adapter merged in (what rollout/vLLM load); the adapter is kept too.
    merge: bool = True


class OptimSection(Section):
    learning_rate: float = 1e-4
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.05
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 2048
    gradient_checkpointing: bool = False
    # A DeepSpeed config file (recipes/deepspeed/zero2.json, zero3.json, *_offload.json) or None.
    deepspeed: str | None = None
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 10


class SFTSection(Section):
    lora: LoraSection = LoraSection()
    optim: OptimSection = OptimSection()
    # Pack several short examples into one max_length sequence (faster; needs a flash-attention-capable setup on GPU).
    packing: bool = False
