"""Recipe section `selfplay`: rollout, self-correction, preference pairs and DPO, for R rounds."""

from __future__ import annotations

from typing import Literal

from medcritical.section import Section
from medcritical.training.config import LoraSection, OptimSection


class RolloutSection(Section):
    samples_per_question: int = 4  # k
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 1024


class CorrectionSection(Section):
    attempts: int = 2  # M tries to correct each wrong trajectory
    temperature: float = 0.7
    language: Literal["zh", "en"] = "zh"


class PairsSection(Section):
    # chosen may also be a correct sample of the same question, not only a verified correction.
    use_correct_samples: bool = True
    max_length_ratio: float = 2.0  # drop pairs whose chosen is this many times longer than rejected
    max_pairs_per_question: int = 4
    heldout_fraction: float = 0.1  # pairs kept aside for held-out reward accuracy / margin


class DPOSection(Section):
    beta: float = 0.3
    loss_type: Literal["sigmoid", "ipo", "sigmoid_sft"] = "sigmoid"
    lora: LoraSection = LoraSection()
    optim: OptimSection = OptimSection(learning_rate=1e-5, epochs=10, per_device_batch_size=1, gradient_accumulation_steps=16)
    precompute_ref_log_probs: bool = False
    early_stopping_patience: int = 3  # evaluations without held-out margin improvement before stopping


class SelfPlayConfig(Section):
    rounds: int = 1
    rollout: RolloutSection = RolloutSection()
    correction: CorrectionSection = CorrectionSection()
    pairs: PairsSection = PairsSection()
    dpo: DPOSection = DPOSection()
