"""Recipe sections of the training steps: `sft` and `selfplay.dpo`. LoraSection and OptimSection are shared."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
    warmup_ratio: float = Field(0.05, ge=0, lt=1)  # share of the total steps
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 2048
    gradient_checkpointing: bool = False
    # A DeepSpeed config: a bare name (zero2, zero3, zero2_offload, zero3_offload: recipes/deepspeed/<name>.json)
    # or a path to a .json file. None trains without DeepSpeed (one process, or plain DDP under torchrun).
    deepspeed: str | None = None
    # A torch optimizer name as transformers spells it. A torch optimizer also under DeepSpeed (no compiled op to
    # build); the *_offload DeepSpeed configs name their own (DeepSpeed's CPU Adam) and override this.
    optimizer: str = "adamw_torch"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 10


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


class DPOSection(Section):
    beta: float = 0.3
    # sigmoid: DPO; ipo: IPO; sigmoid_sft: DPO plus an SFT (NLL) term on chosen, weighted by sft_weight.
    loss_type: Literal["sigmoid", "ipo", "sigmoid_sft"] = "sigmoid"
    sft_weight: float = 1.0  # weight of the SFT term in sigmoid_sft
    lora: LoraSection = LoraSection()
    optim: OptimSection = OptimSection(learning_rate=1e-5, epochs=10, per_device_batch_size=1, gradient_accumulation_steps=16)
    # Reference log-probs computed once before training, then the reference model is freed (saves memory).
    precompute_ref_log_probs: bool = False
    # Held-out evaluations over the whole run (reward accuracy and margin on pairs_heldout.jsonl).
    evaluations: int = Field(20, ge=1)
    early_stopping_patience: int = 3  # evaluations without held-out margin improvement before stopping (0: off)
    # At the end, load the checkpoint with the best held-out margin (a checkpoint is then saved at every
    # evaluation, replacing optim.save_steps); off keeps the last step's weights.
    restore_best: bool = True
