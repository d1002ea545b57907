"""Recipe section `selfplay`: rollout, self-correction, preference pairs and DPO, for R rounds.

The DPO step's own settings (`selfplay.dpo`) live with the trainer, in `training/config.py`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medcritical.section import Section
from medcritical.training.config import DPOSection


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
    # Cap on training pairs per round (None: all); a seeded subset is kept (the paper trained on 1,000).
    max_pairs: int | None = Field(None, ge=1)


class SelfPlayConfig(Section):
    rounds: int = Field(1, ge=1)
    rollout: RolloutSection = RolloutSection()
    correction: CorrectionSection = CorrectionSection()
    pairs: PairsSection = PairsSection()
    dpo: DPOSection = DPOSection()
