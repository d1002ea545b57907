"""Models: the offline tiny model (tiny), generation backends (generation), model resolution."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from medcritical.errors import MissingInputError
from medcritical.modeling.check import check_model_folder
from medcritical.modeling.config import TINY, TinyModelSection
from medcritical.modeling.tiny import ensure_tiny_model


def cache_dir() -> Path:
    """Where built artifacts shared between runs live (the tiny model): $MEDCRITICAL_CACHE."""
    return Path(os.environ.get("MEDCRITICAL_CACHE", Path.home() / ".cache" / "medcritical"))


def resolve_model(model: str, tiny: TinyModelSection = TinyModelSection()) -> Path:
    """A local model folder for `model`: "tiny" (built once, cached by its settings) or a folder."""
    if model == TINY:
        key = hashlib.sha256(json.dumps(tiny.model_dump(), sort_keys=True).encode()).hexdigest()[:10]
        return ensure_tiny_model(cache_dir() / f"tiny-{key}", tiny)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise MissingInputError(
            f"{model}: not a Hugging Face model folder (no config.json); give a local model folder "
            "or 'tiny' for the offline test model"
        )
    check_model_folder(path)  # config, weights, tokenizer, chat template, manifest: before any work loads it
    return path
