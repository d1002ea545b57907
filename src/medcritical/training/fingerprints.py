"""What a training stage's checkpoints and model are made from: the fingerprint it records beside them.

One function per trainer, used twice: by the trainer, which records it and refuses to resume other work
(`common.check_training_resume`), and by the stage's declaration (`Stage.expected_fingerprint`), from which
the runner decides whether the output folder already holds the finished run. Light imports only: the runner
reads the declarations without loading TRL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medcritical.io.fingerprint import model_fingerprint
from medcritical.io.hashing import file_sha256
from medcritical.training.config import DPOSection, SFTSection

# Keys that change how a run goes on or what it keeps, not the model it trains.
NOT_FINGERPRINTED = {"resume", "keep_checkpoints"}


def sft_fingerprint(config: SFTSection, dataset_path: str | Path, model_path: str | Path, seed: int) -> dict[str, Any]:
    """Settings, seed, the data's checksum and the starting weights."""
    return {
        "settings": config.model_dump(mode="json", exclude=NOT_FINGERPRINTED),
        "seed": seed,
        "dataset": file_sha256(Path(dataset_path)),
        "model": model_fingerprint(model_path),
    }


def dpo_fingerprint(
    config: DPOSection, pairs_path: str | Path, heldout_path: str | Path | None, model_path: str | Path, seed: int
) -> dict[str, Any]:
    """Settings, seed, the checksums of the pairs and held-out pairs and the starting weights."""
    return {
        "settings": config.model_dump(mode="json", exclude=NOT_FINGERPRINTED),
        "seed": seed,
        "pairs": file_sha256(Path(pairs_path)),
        "heldout": file_sha256(Path(heldout_path)) if heldout_path else None,
        "model": model_fingerprint(model_path),
    }
