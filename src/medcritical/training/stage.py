"""The SFT stage's declaration (see medcritical.core.stage): verified traces and a base model in, a model out.

DPO's declaration lives with self-play (selfplay/stage.py), whose round it is; both train with this package.
"""

from __future__ import annotations

from pathlib import Path

from medcritical.core.stage import MODEL, OUTPUT_URI, Input, Stage
from medcritical.distill.run import SFT_FILE
from medcritical.io.fingerprint import FINGERPRINT_FILE
from medcritical.io.manifest import MANIFEST_NAME
from medcritical.training.fingerprints import sft_fingerprint

# Periodic checkpoints only serve a resume inside the step: never published with the step's folder
# (a 7B full fine-tune's checkpoints are hundreds of GB).
CHECKPOINTS = "checkpoints"
SFT_METRICS = "sft_metrics.json"


def _run(
    recipe, output_dir: Path, *, distill: Path, model: Path, restart: bool = False, output_uri: str | None = None
) -> dict:
    # The trainer (TRL, peft, datasets: ~4 s to import) loads when SFT runs, not when the runner reads
    # the declarations of every stage (`medcritical evaluate` would pay for it).
    from medcritical.training.sft import train_sft

    return train_sft(
        recipe.sft,
        distill,
        model,
        output_dir,
        device=recipe.run.device,
        dtype=recipe.model.dtype,
        seed=recipe.run.seed,
        restart=restart,
        output_uri=output_uri,
    )


def _expected_fingerprint(recipe, *, distill: Path, model: Path, **_options) -> dict:
    return sft_fingerprint(recipe.sft, distill, model, recipe.run.seed)


SFT = Stage(
    name="sft",
    folder="sft",
    section="sft",
    run=_run,
    inputs={"distill": Input(SFT_FILE, default_stage="distill"), "model": MODEL},
    outputs=(CHECKPOINTS, "model", "adapter", SFT_METRICS, "sft_loss.png", FINGERPRINT_FILE, MANIFEST_NAME),
    stats=SFT_METRICS,
    fingerprint=FINGERPRINT_FILE,  # settings, seed, data checksum, starting weights
    options=("restart", OUTPUT_URI),  # output_uri: an s3:// one keeps the checkpoints there too
    produces="model",
    local_only=(CHECKPOINTS,),
    optional=("adapter", "sft_loss.png"),  # adapter/: LoRA only
    expected_fingerprint=_expected_fingerprint,
)
