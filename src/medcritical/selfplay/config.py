"""Recipe section `selfplay`: rollout, self-correction, preference pairs and DPO, for R rounds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medcritical.section import Section
from medcritical.training.config import LoraSection, OptimSection


class RolloutSection(Section):
    samples_per_question: int = Field(4, ge=1)  # k
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)
    # Language of the mcq prompt the student answers (the same prompt file as evaluation).
    language: Literal["zh", "en"] = "zh"
    # Questions per generation call; results are appended to rollouts.jsonl after each call, so this
    # is also how much work a crash can lose. vLLM batches best with large chunks.
    chunk_size: int = Field(256, ge=1)


class CorrectionSection(Section):
    attempts: int = Field(2, ge=0)  # M tries to correct each wrong trajectory (0: no self-correction)
    temperature: float = Field(0.7, ge=0)
    language: Literal["zh", "en"] = "zh"


class PairsSection(Section):
    # chosen may also be a correct sample of the same question, not only a verified correction.
    use_correct_samples: bool = True
    max_length_ratio: float = Field(2.0, gt=0)  # drop pairs whose chosen is this many times longer than rejected
    max_pairs_per_question: int = Field(4, ge=1)
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # share of questions whose pairs are held out


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


class SelfPlayConfig(Section):
    rounds: int = Field(1, ge=1)
    rollout: RolloutSection = RolloutSection()
    correction: CorrectionSection = CorrectionSection()
    pairs: PairsSection = PairsSection()
    dpo: DPOSection = DPOSection()
