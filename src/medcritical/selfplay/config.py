"""Recipe section `selfplay`: rollout, self-correction, preference pairs and DPO, for R rounds.

The DPO step's own settings (`selfplay.dpo`) live with the trainer, in `training/config.py`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medcritical.core.section import Section
from medcritical.modeling.config import MAX_TEMPERATURE, MAX_TOKENS
from medcritical.training.config import DPOSection


class RolloutSection(Section):
    samples_per_question: int = Field(4, ge=1, le=1024)  # k
    temperature: float = Field(0.8, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1, le=MAX_TOKENS)
    # Language of the mcq prompt the student answers (the same prompt file as evaluation).
    language: Literal["zh", "en"] = "zh"
    # Questions per generation call; results are appended to rollouts.jsonl after each call, so this
    # is also how much work a crash can lose. vLLM batches best with large chunks.
    chunk_size: int = Field(256, ge=1, le=1_000_000)


class CorrectionSection(Section):
    attempts: int = Field(2, ge=0, le=100)  # M tries to correct each wrong trajectory (0: no self-correction)
    temperature: float = Field(0.7, ge=0, le=MAX_TEMPERATURE)
    language: Literal["zh", "en"] = "zh"
    # Corrections sampled per attempt; the attempt is stable when at least `min_votes` of them state
    # the gold letters (null: a strict majority). 3 votes with a majority of 2 let a guessing model
    # through about 10% as often as a single vote at 5 options (3p²-2p³ against p, p = 0.2).
    votes: int = Field(3, ge=1, le=100)
    min_votes: int | None = Field(None, ge=1, le=100)
    # The chosen answer is a fresh answer to the original question alone, rewritten by the student from
    # the stable correction (rewrite.<lang>.txt), graded again: gold reached a second time, in the trained
    # format, with no word about an earlier attempt. Sampled at this temperature.
    rewrite_temperature: float = Field(0.3, ge=0.0, le=MAX_TEMPERATURE)

    @model_validator(mode="after")
    def _votes_reachable(self):
        if self.min_votes is not None and self.min_votes > self.votes:
            raise ValueError(
                f"correction.min_votes={self.min_votes} exceeds correction.votes={self.votes}: no correction could "
                "ever be accepted; lower min_votes or raise votes"
            )
        return self

    @property
    def needed_votes(self) -> int:
        return self.min_votes if self.min_votes is not None else self.votes // 2 + 1


class PairsSection(Section):
    # chosen may also be a correct sample of the same question, not only a verified correction.
    use_correct_samples: bool = True
    max_length_ratio: float = Field(
        2.0, gt=0, le=1000
    )  # drop pairs whose chosen is this many times longer than rejected
    max_pairs_per_question: int = Field(4, ge=1, le=1_000_000)
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # share of questions whose pairs are held out
    # Cap on training pairs per round (None: all); a seeded subset is kept (the paper trained on 1,000).
    max_pairs: int | None = Field(None, ge=1)
    # thought: chosen and rejected are whole trajectories (<think>… then the answer); answer: only their
    # final answer statement (after </think>), the paper's answer-level ablation.
    level: Literal["thought", "answer"] = "thought"


class CostSection(Section):
    """Prices that turn the counted tokens and seconds into money per pair (null: not priced)."""

    # The correcting teacher's API price, prompt + completion tokens; null: distill.price_per_million_tokens.
    teacher_price_per_million_tokens: float | None = Field(None, ge=0.0, le=1_000_000)
    # What one accelerator-hour (or CPU-hour without one) of the rollout step costs.
    device_hour_price: float | None = Field(None, ge=0.0, le=1_000_000)
    # The prices' currency, carried with every money figure (the prices are the user's: an estimate).
    currency: str = "USD"


class SelfPlaySection(Section):
    rounds: int = Field(1, ge=1, le=100)
    # Who corrects a wrong trajectory: the student itself (the paper's method), or the distillation
    # teacher of the `distill` section (any backend, a served endpoint included), the baseline the paper
    # compares with. Everything after the correction (votes, rewrite, pairs, DPO) is the same code.
    corrector: Literal["self", "teacher"] = "self"
    cost: CostSection = CostSection()
    rollout: RolloutSection = RolloutSection()
    correction: CorrectionSection = CorrectionSection()
    pairs: PairsSection = PairsSection()
    dpo: DPOSection = DPOSection()
