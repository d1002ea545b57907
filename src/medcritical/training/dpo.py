"""Stage 2 training: DPO on self-play preference pairs (TRL DPOTrainer), LoRA or full fine-tuning.

    # one process (CPU or one GPU)
    medcritical dpo --recipe recipes/demo.yaml --pairs runs/demo/rollout/pairs.jsonl --model runs/demo/sft/model \
        --output runs/demo/dpo

    # 8 GPUs, DeepSpeed from the recipe (selfplay.dpo.deepspeed: zero2 or zero3)
    torchrun --nproc_per_node 8 -m medcritical.cli dpo --recipe recipes/paper-7b-lora.yaml --pairs ... --model ... --output ...

The reference model is the model DPO starts from, in every mode (the pains this design avoids: a
reference reloaded from a stale folder, one that OOMs, one broken by ZeRO-3 partitioning):
- LoRA: no second model; the reference is the policy with its adapter disabled.
- precompute_ref_log_probs: reference log-probs of every pair are computed once by the starting
  model before the first step, then no reference is kept (the least memory).
- full fine-tuning: an in-memory copy of the policy as passed in (TRL 1.16 would otherwise reload
  `config._name_or_path` from disk, which is not the model in memory after SFT in the same process);
  under ZeRO-3 a copy of partitioned weights is not possible, so the reference is loaded from
  `model_path` partitioned (the same weights the policy was loaded from).
The first held-out evaluation runs before any step and must show a reward margin of ~0 (policy ==
reference): a reference that differs from the policy shows up there, recorded and warned about.

Output folder: checkpoints/ (a rerun resumes from the newest), model/ (full HF folder, LoRA merged, what the
next round and evaluation load), adapter/ (LoRA), dpo_metrics.json, dpo_loss.png, dpo_heldout.png,
fingerprint.json (what it was trained from: a rerun with other settings, pairs or starting weights is refused),
_MANIFEST.json (size and sha256 of every file, written last: marks the run done).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoTokenizer, EarlyStoppingCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import DPOConfig, DPOTrainer

from medcritical.core.values import number_text
from medcritical.training.checks import PreTrainingCheckError, check_tokenizer
from medcritical.training.common import load_model_for_training, lora_config, trainer_arguments
from medcritical.training.config import DPOSection
from medcritical.training.dpo_data import drop_too_long, read_pairs, split_heldout
from medcritical.training.dpo_heldout import (
    MARGIN,
    FirstEpochHeldout,
    first_epoch_heldout,
    heldout_summary,
    kept_model,
    plot_heldout,
    selects_on_heldout,
)
from medcritical.training.fingerprints import dpo_fingerprint
from medcritical.training.lifecycle import TrainingRun
from medcritical.training.saving import SavedModel

log = logging.getLogger(__name__)

# The held-out margin before any step; above this, the reference is not the policy's starting point.
REFERENCE_TOLERANCE = 0.05
# Smallest held-out margin gain that counts as an improvement for early stopping.
EARLY_STOPPING_MIN_DELTA = 1e-4


def reference_model(config: DPOSection, policy, model_path: str | Path, device: str, dtype: str):
    """The reference for DPO (see the module docstring): None where TRL derives it correctly itself."""
    if config.lora.enabled:
        return None  # the policy with its adapter disabled
    if config.settings.get("precompute_ref_log_probs", False):
        return None  # TRL runs the untouched policy over every pair before the first step
    if is_deepspeed_zero3_enabled():
        return load_model_for_training(model_path, device, dtype)
    reference = copy.deepcopy(policy)
    reference.requires_grad_(False)
    return reference.eval()


def reference_kind(config: DPOSection) -> str:
    if config.settings.get("precompute_ref_log_probs", False):
        return "precomputed log-probs of the starting model"
    if config.lora.enabled:
        return "the policy with its LoRA adapter disabled"
    return "a frozen copy of the starting model"


def build_dpo_trainer(
    config: DPOSection,
    policy,
    tokenizer,
    train_pairs: list[dict],
    heldout_pairs: list[dict],
    args,
    *,
    model_path: str | Path,
    device: str = "cpu",
    dtype: str = "auto",
    callbacks: Sequence[Any] = (),
    reporting_pairs: Sequence[dict] = (),
):
    """A TRL DPOTrainer for `policy` (the model in memory) with the right reference for the mode.

    `args` comes from `dpo_arguments`; under ZeRO-3 it must exist (and stay referenced) before the
    policy is loaded, so the weights load partitioned, as `train_dpo` does. `heldout_pairs` are evaluated
    during training; `reporting_pairs` (the reporting half, see `split_heldout`) are prepared with them
    (tokenized, reference log-probs precomputed where the mode needs them: after training the reference
    may be gone) and kept aside as `trainer.reporting_dataset` for one evaluation of the kept model.
    """
    held = Dataset.from_list(heldout_pairs) if heldout_pairs else None
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference_model(config, policy, model_path, device, dtype),
        args=args,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset={"selection": held, "reporting": Dataset.from_list(list(reporting_pairs))}
        if held is not None and reporting_pairs
        else held,
        processing_class=tokenizer,
        peft_config=lora_config(config.lora),
        callbacks=list(callbacks),
    )
    trainer.reporting_dataset = None
    if isinstance(trainer.eval_dataset, dict):  # only the selection half is evaluated during training
        trainer.reporting_dataset = trainer.eval_dataset["reporting"]
        trainer.eval_dataset = trainer.eval_dataset["selection"]
    return trainer


def even_eval_batch_size(heldout_pairs: int, batch_size: int, world_size: int = 1) -> int:
    """The largest evaluation batch size up to `batch_size` that splits the held-out pairs into equal
    batches. TRL logs the mean of per-batch means: with 9 pairs in batches of 4, 4 and 1 the last pair
    would weigh a third of the reported margin and reward accuracy instead of a ninth."""
    for size in range(max(batch_size, 1), 0, -1):
        if heldout_pairs % (size * world_size) == 0:
            return size
    return 1


def dpo_arguments(
    config: DPOSection,
    checkpoints_dir,
    *,
    device: str,
    seed: int,
    deepspeed: Path | None,
    heldout: bool,
    eval_on_start: bool = False,
    heldout_pairs: int | None = None,
):
    """TRL DPOConfig. `eval_on_start`: one held-out evaluation before the first step, inside the training
    loop (a separate `trainer.evaluate()` before `train()` breaks DeepSpeed's engine set-up)."""
    settings = config.settings
    evaluate_during = heldout and config.evaluations > 1
    arguments = trainer_arguments(settings, checkpoints_dir, device=device, seed=seed, deepspeed=deepspeed)
    batch = settings.get("per_device_eval_batch_size", settings["per_device_train_batch_size"])
    # Even held-out batches: the reported margin and reward accuracy are then means over pairs.
    arguments["per_device_eval_batch_size"] = (
        even_eval_batch_size(heldout_pairs, batch, int(os.environ.get("WORLD_SIZE", "1"))) if heldout_pairs else batch
    )
    if evaluate_during:
        # Every 1/evaluations of the steps; the margin is the metric transformers' early stopping watches.
        arguments.update(
            eval_strategy="steps",
            eval_steps=1 / config.evaluations,
            metric_for_best_model=MARGIN,
            greater_is_better=True,
        )
        if config.restore_best:
            # A checkpoint at every evaluation, and the best held-out margin's one loaded at the end.
            arguments.update(save_steps=1 / config.evaluations, load_best_model_at_end=True)
    return DPOConfig(**arguments, eval_on_start=heldout and eval_on_start)


def train_dpo(
    config: DPOSection,
    pairs_path: str | Path,
    heldout_path: str | Path | None,
    model_path: str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    callbacks: Sequence[Any] = (),
    restart: bool = False,
    output_uri: str | None = None,
) -> dict[str, Any]:
    """DPO from the model in `model_path` on `pairs_path`; writes model/ and dpo_metrics.json to output_dir.

    No training pairs is not an error but an explicit result: {"status": "skipped", "reason": ...,
    "model": model_path} (the model is unchanged). Resumes from the newest checkpoint (selfplay.dpo.resume), only
    for the same settings, pairs and starting weights (`fingerprint.json`); `restart` discards what is there
    instead of refusing. Whether the folder already holds the finished run is the runner's to decide.
    `output_uri` is where the runner publishes output_dir: an s3:// one also keeps the checkpoints in
    <output_uri>/checkpoints/, where a new machine resumes from (training/remote_checkpoints.py). The steps are
    `lifecycle.TrainingRun`'s.
    """
    options = dict(device=device, dtype=dtype, seed=seed, callbacks=callbacks, restart=restart, output_uri=output_uri)
    return DPORun(config, pairs_path, heldout_path, model_path, output_dir, **options).run()


class DPORun(TrainingRun):
    """What DPO provides to the training lifecycle: pairs (a held-out half picks the model, the other reports
    it), the reference of the mode, early stopping on the held-out margin, the final held-out evaluations."""

    step = "dpo"

    def __init__(self, config: DPOSection, pairs_path, heldout_path, model_path, output_dir, **options):
        super().__init__(config, model_path, output_dir, **options)
        self.pairs_path, self.heldout_path = pairs_path, heldout_path

    def prepare(self) -> dict[str, Any] | None:
        config, pairs_path = self.config, self.pairs_path
        self.train_pairs = read_pairs(pairs_path)
        self.heldout_pairs = read_pairs(self.heldout_path) if self.heldout_path else []
        if not self.train_pairs:
            reason = f"no training pairs in {pairs_path} (see rollout_stats.json: no_pairs)"
            return _skipped(self.output_dir, self.model_path, reason)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.facts = check_tokenizer(self.tokenizer, str(self.model_path), assistant_only_loss=False)
        max_length = config.settings["max_length"]
        self.train_pairs, too_long = drop_too_long(self.train_pairs, self.tokenizer, max_length)
        self.heldout_pairs, heldout_too_long = drop_too_long(self.heldout_pairs, self.tokenizer, max_length)
        self.dropped = too_long + heldout_too_long
        # Pairs that pick the model never report its figures: a margin chosen as the best of 20 on the same
        # pairs is biased upward (the demo reported 100% on the one pair it picked a checkpoint with).
        self.reporting_pairs: list[dict] = []
        if selects_on_heldout(config, bool(self.heldout_pairs)):
            self.heldout_pairs, self.reporting_pairs = split_heldout(self.heldout_pairs, self.seed)
            if not self.reporting_pairs:
                log.warning(
                    "held-out pairs of a single question: the kept model is picked and reported on the same pairs "
                    "(biased); raise selfplay.pairs.heldout_fraction"
                )
        if not self.train_pairs:
            raise PreTrainingCheckError(
                f"{pairs_path}: every pair is longer than selfplay.dpo.trainer.max_length={max_length} "
                "tokens; raise it, or lower selfplay.rollout.max_new_tokens"
            )
        return None

    def fingerprint(self) -> dict[str, Any]:
        return dpo_fingerprint(self.config, self.pairs_path, self.heldout_path, self.model_path, self.seed)

    def arguments(self, checkpoints: Path, resume_from: str | None):
        return dpo_arguments(
            self.config,
            checkpoints,
            device=self.device,
            seed=self.seed,
            deepspeed=self.deepspeed,
            heldout=bool(self.heldout_pairs),
            eval_on_start=not resume_from,
            # One batch size that splits both halves evenly (the reporting half is evaluated with it too).
            heldout_pairs=math.gcd(len(self.heldout_pairs), len(self.reporting_pairs)),
        )

    def resuming(self, args, resume_from: str | None) -> None:
        args.eval_on_start = bool(self.heldout_pairs) and not resume_from  # a resumed run was evaluated at its start

    def own_callbacks(self, args) -> list[Any]:
        # transformers' own early stopping, on the held-out margin (DPO's training loss can fall to ~0 early, as
        # the paper saw, while held-out pairs stop improving: further steps then only overfit).
        early_stopping = (
            [EarlyStoppingCallback(self.config.early_stopping_patience, EARLY_STOPPING_MIN_DELTA)]
            if self.config.early_stopping_patience and args.metric_for_best_model
            else []
        )
        first_epoch = [FirstEpochHeldout(save=bool(args.load_best_model_at_end))] if self.heldout_pairs else []
        return [*early_stopping, *first_epoch]

    def build_trainer(self, model, args, callbacks: list[Any]):
        return build_dpo_trainer(
            self.config,
            model,
            self.tokenizer,
            self.train_pairs,
            self.heldout_pairs,
            args,
            model_path=self.model_path,
            device=self.device,
            dtype=self.dtype,
            callbacks=callbacks,
            reporting_pairs=self.reporting_pairs,
        )

    def after_train(self, trainer, args) -> None:
        self.history = list(trainer.state.log_history)  # before the final evaluation adds its own entry
        self.initial = next((e for e in self.history if MARGIN in e and e.get("step") == 0), None)
        if self.initial and abs(self.initial[MARGIN]) > REFERENCE_TOLERANCE:
            log.warning(
                "the held-out reward margin before training was %.4f, not ~0: the reference is not the model DPO "
                "started from (check the model folder and selfplay.dpo.trainer.precompute_ref_log_probs)",
                self.initial[MARGIN],
            )
        self.final = trainer.evaluate() if self.heldout_pairs else None
        self.reported = None
        if trainer.reporting_dataset is not None:  # the kept model on pairs that did not pick it
            trainer.eval_dataset = trainer.reporting_dataset
            self.reported = trainer.evaluate()

    def metrics(self, trainer, args, saved: SavedModel, resume_from: str | None, training: dict) -> dict[str, Any]:
        config, heldout_pairs, state = self.config, self.heldout_pairs, trainer.state
        best_checkpoint = state.best_model_checkpoint if args.load_best_model_at_end else None
        restored_best = Path(best_checkpoint).name if best_checkpoint else None
        selects = selects_on_heldout(config, bool(heldout_pairs))
        heldout = heldout_summary(self.history, self.initial, self.final, self.reported, len(heldout_pairs), selects)
        return {
            "step": "dpo",
            "status": "trained",
            "model": str(saved.model_dir),
            "train_pairs": len(self.train_pairs),
            "heldout_pairs": len(heldout_pairs) + len(self.reporting_pairs),
            "reporting_pairs": len(self.reporting_pairs),  # of the held-out pairs, those kept apart from selection
            "dropped_too_long": self.dropped,
            "loss_type": "+".join(args.loss_type) if isinstance(args.loss_type, list) else args.loss_type,
            "beta": args.beta,
            "reference": reference_kind(config),
            "device": self.device,
            "deepspeed": self.deepspeed.name if self.deepspeed else None,
            "zero_stage": self.zero_stage,
            "lora": config.lora.enabled,
            "merged": saved.merged,
            "resumed_from": Path(resume_from).name if resume_from else None,
            "stopped_early": state.global_step if state.global_step < state.max_steps else None,
            "restored_best": restored_best,
            "heldout": heldout,
            "kept": kept_model(config, state, restored_best, bool(heldout_pairs)),
            "heldout_after_first_epoch": first_epoch_heldout(self.history, self.final, state.epoch)
            if heldout_pairs
            else None,
            "warnings": _warnings(training["loss_curve"], config, heldout and heldout["best_step"], restored_best),
            **training,
        }

    def extra_files(self, metrics: dict[str, Any]) -> list[Path]:
        return [plot_heldout(metrics, self.output_dir / "dpo_heldout.png")] if metrics["heldout"] else []

    def log_done(self, metrics: dict[str, Any], saved: SavedModel) -> None:
        held = metrics["heldout"] or {}
        log.info(
            "DPO done: %d steps, loss %s -> %s; kept %s (%s); held-out reward accuracy %s, margin %s, on %s; model in %s",
            metrics["steps"],
            number_text(metrics["loss_first"]),
            number_text(metrics["loss_last"]),
            metrics["kept"]["model"],
            metrics["kept"]["why"],
            number_text(held.get("reward_accuracy")),
            number_text(held.get("margin")),
            held.get("measured_on"),
            saved.model_dir,
        )


def _skipped(output_dir: Path, model_path: Path, reason: str) -> dict:
    log.warning("DPO skipped: %s; the model is unchanged", reason)
    metrics = {"step": "dpo", "status": "skipped", "reason": reason, "model": str(model_path)}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "dpo_metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    return metrics


def _warnings(
    curve: list[dict], config: DPOSection, best_step: int | None = None, restored: str | None = None
) -> list[str]:
    warnings = []
    if restored and best_step == 0:
        # Only trained steps have checkpoints: the restore cannot go back to the starting model.
        warnings.append(
            f"the held-out margin was best before training (step 0); the kept model is {restored}, the best "
            "trained checkpoint, not the starting model: lower selfplay.dpo.trainer.learning_rate, or keep the SFT model"
        )
    losses = [p["loss"] for p in curve]
    if (
        list(config.settings.get("loss_type") or ["sigmoid"]) == ["sigmoid"]
        and len(losses) > 1
        and all(abs(x - math.log(2)) < 1e-3 for x in losses)
    ):
        warnings.append(
            "the loss stayed at ln 2 = 0.6931 throughout: the policy never moved away from the reference "
            "(learning rate too low for this many steps, or the reference is the policy itself)"
        )
    for warning in warnings:
        log.warning(warning)
    return warnings
