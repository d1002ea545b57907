"""The SFT stage's declaration (see medcritical.stage): verified traces and a base model in, a model out.

DPO's declaration lives with self-play (selfplay/stage.py), whose round it is; both train with this package.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from medcritical import storage
from medcritical.distill.run import SFT_FILE
from medcritical.io.fingerprint import FINGERPRINT_FILE
from medcritical.io.manifest import MANIFEST_NAME
from medcritical.stage import MODEL, Input, Stage

log = logging.getLogger(__name__)

# Periodic checkpoints only serve a resume inside the step: never published with the step's folder
# (a 7B full fine-tune's checkpoints are hundreds of GB).
CHECKPOINTS = "checkpoints"
SFT_METRICS = "sft_metrics.json"


def _run(recipe, output_dir: Path, *, distill: Path, model: Path, restart: bool = False) -> dict:
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
        output_uri=published_uri(recipe, output_dir, "sft"),
    )


def published_uri(recipe, output_dir: Path, *folders: str) -> str | None:
    """The S3 URI the runner publishes `output_dir` to, when it is one of `folders` under the run root
    (run.output_dir): where the pipeline, the TrainJobs and the round loop write. None otherwise.

    The runner hands a stage only its local folder; for an S3 output that is a scratch folder named after the
    URI (staging.local_output_path: <work>/out/<first 16 hex digits of the URI's sha256>), so the run root's
    URI is recognised by the name it gives (tests/test_remote_checkpoints.py holds both namings together).
    A DPO round would pass its round folders: round1-dpo, round2-dpo, ...
    """
    for folder in folders:
        uri = f"{recipe.run.root.rstrip('/')}/{folder}"
        if storage.is_s3(uri) and output_dir.name == scratch_name(uri):
            return uri
    if output_dir.parent.name == "out" and re.fullmatch(r"[0-9a-f]{16}", output_dir.name):  # another S3 output
        log.warning(
            "%s: checkpoints stay on this machine only (a new pod would start over): this S3 output is not the "
            "run root's %s/ folder (run.output_dir is %s); to keep them in S3, set run.output_dir to the run's "
            "s3:// folder and write to <run.output_dir>/%s",
            output_dir,
            folders[0],
            recipe.run.root,
            folders[0],
        )
    return None


def scratch_name(uri: str) -> str:
    """The name of the local folder an S3 output is written in before it is published."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


SFT = Stage(
    name="sft",
    folder="sft",
    section="sft",
    run=_run,
    inputs={"distill": Input(SFT_FILE, default_stage="distill"), "model": MODEL},
    outputs=(CHECKPOINTS, "model", "adapter", SFT_METRICS, "sft_loss.png", FINGERPRINT_FILE, MANIFEST_NAME),
    stats=SFT_METRICS,
    fingerprint=FINGERPRINT_FILE,  # settings, seed, data checksum, starting weights
    options=("restart",),
    produces="model",
    local_only=(CHECKPOINTS,),
)
