"""The one lifecycle of a training stage: SFT and DPO follow it, each providing only what differs.

As torchtune's recipes do, `TrainingRun.run` fixes the order once:

    setup (device)  -> prepare (tokenizer, data, pre-training checks; may end the run: DPO without pairs)
    -> DeepSpeed config -> fingerprint and resume check (`common.check_training_resume`) -> data (the rows)
    -> in the process group: the resume point (the newest local checkpoint, or one a pod before uploaded)
    -> trainer arguments (before the model: under ZeRO-3 it then loads partitioned) -> model -> trainer
    -> train -> after_train (DPO's final held-out evaluations) -> save (`saving.save_final_model`)
    -> metrics -> publish: <step>_metrics.json, its loss plot, extra files, and _MANIFEST.json written last.

Whether the output folder already holds the finished run is not decided here but by the runner, from the
stage's declaration (runner.finished_stats). A rerun that gets this far resumes from the newest checkpoint
when the section's `resume` is on (sft.resume, selfplay.dpo.resume).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medcritical.io.manifest import write_manifest
from medcritical.training.common import (
    check_training_resume,
    deepspeed_config_path,
    deepspeed_zero_stage,
    distributed_group,
    find_resumable_checkpoint,
    load_model_for_training,
    stop_on_token,
    training_device,
)
from medcritical.training.metrics import ThroughputCallback, summarize_training, write_metrics
from medcritical.training.remote_checkpoints import checkpoint_callbacks, fetch_checkpoint, remote_checkpoints_uri
from medcritical.training.saving import SavedModel, save_final_model

log = logging.getLogger(__name__)


class TrainingRun:
    """One run of a training stage into `output_dir`. Subclasses set `step` and implement the hooks below.

    `config` is the recipe section (it has `resume`, `deepspeed` and `lora`); `callbacks` are extra transformers
    TrainerCallbacks; `output_uri` is where the runner publishes output_dir (an s3:// one also keeps the
    checkpoints in <output_uri>/checkpoints/, where a new machine resumes from: training/remote_checkpoints.py).
    """

    step: str  # "sft", "dpo": names <step>_metrics.json and <step>_loss.png

    def __init__(
        self,
        config,
        model_path: str | Path,
        output_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        seed: int = 0,
        callbacks: Sequence[Any] = (),
        restart: bool = False,
        output_uri: str | None = None,
    ):
        self.config, self.model_path, self.output_dir = config, Path(model_path), Path(output_dir)
        self.device, self.dtype, self.seed = device, dtype, seed
        self.callbacks, self.restart, self.output_uri = list(callbacks), restart, output_uri
        self.deepspeed: Path | None = None
        self.zero_stage: int | None = None
        self.facts = None  # checks.TokenizerFacts, from `prepare`

    # -- what each trainer provides ---------------------------------------------------------------------------

    def prepare(self) -> dict[str, Any] | None:
        """Tokenizer, data and the checks before training (sets `self.facts`); a result ends the run here."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What the checkpoints and the model are made from (training/fingerprints.py)."""
        raise NotImplementedError

    def data(self) -> None:
        """The trainer's rows, once the folder's earlier work is known to be of the same inputs."""

    def arguments(self, checkpoints: Path, resume_from: str | None):
        """The TRL config (SFTConfig, DPOConfig), checkpoints saved into `checkpoints`."""
        raise NotImplementedError

    def resuming(self, args, resume_from: str | None) -> None:
        """The resume point changed after `arguments` (a checkpoint fetched from S3)."""

    def own_callbacks(self, args) -> list[Any]:
        """Callbacks of this trainer, between the throughput meter and the checkpoint uploader."""
        return []

    def build_trainer(self, model, args, callbacks: list[Any]):
        raise NotImplementedError

    def after_train(self, trainer, args) -> None:
        """Work between the last step and saving (DPO's final held-out evaluations)."""

    def metrics(self, trainer, args, saved: SavedModel, resume_from: str | None, training: dict) -> dict[str, Any]:
        """The run's statistics; `training` is `metrics.summarize_training`'s."""
        raise NotImplementedError

    def extra_files(self, metrics: dict[str, Any]) -> list[Path]:
        """Files written besides the model and the metrics, listed in the manifest (DPO's held-out plot)."""
        return []

    def log_done(self, metrics: dict[str, Any], saved: SavedModel) -> None:
        raise NotImplementedError

    # -- the lifecycle ----------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.device = training_device(self.device)
        ended = self.prepare()
        if ended is not None:
            return ended
        self.deepspeed = deepspeed_config_path(self.config.deepspeed)
        self.zero_stage = deepspeed_zero_stage(self.deepspeed)
        fingerprint = self.fingerprint()
        resumable = check_training_resume(self.output_dir, fingerprint, restart=self.restart)
        remote = remote_checkpoints_uri(self.output_uri, deepspeed=self.deepspeed is not None)
        self.data()
        with distributed_group(self.device, self.deepspeed):
            return self._train(fingerprint, resumable, remote)

    def _train(self, fingerprint: dict[str, Any], resumable: bool, remote: str | None) -> dict[str, Any]:
        checkpoints = self.output_dir / "checkpoints"
        resume = self.config.resume
        resume_from = find_resumable_checkpoint(checkpoints) if resumable and resume else None
        # The trainer config exists before the model loads: under ZeRO-3 the weights then load partitioned.
        args = self.arguments(checkpoints, resume_from)
        if remote and resume:  # on a new machine: the newest checkpoint the pod before it uploaded (every rank)
            resume_from = fetch_checkpoint(args, remote, fingerprint, restart=self.restart)
            self.resuming(args, resume_from)
        model = load_model_for_training(self.model_path, self.device, self.dtype)
        stop_on_token(model, self.facts.end_of_turn_id)
        throughput = ThroughputCallback()
        callbacks = [throughput, *self.own_callbacks(args), *checkpoint_callbacks(remote, fingerprint), *self.callbacks]
        trainer = self.build_trainer(model, args, callbacks)
        if resume_from:
            log.info("resuming from %s", resume_from)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume_from)
        wall_seconds = time.perf_counter() - started
        self.after_train(trainer, args)

        saved = save_final_model(
            trainer, self.output_dir, base_model_path=self.model_path, merge=self.config.lora.merge
        )
        training = summarize_training(trainer, throughput, wall_seconds=wall_seconds)
        metrics = self.metrics(trainer, args, saved, resume_from, training)
        if trainer.is_world_process_zero():
            files = [saved.model_dir, *write_metrics(self.output_dir, self.step, metrics), *self.extra_files(metrics)]
            write_manifest(self.output_dir, files + ([saved.adapter_dir] if saved.adapter_dir else []))
            self.log_done(metrics, saved)
        trainer.accelerator.wait_for_everyone()
        return metrics
