"""Recipe sections of the training steps: `sft` and `selfplay.dpo`.

TRL's own configs, not a copy of them: a section's `trainer:` mapping goes to `trl.SFTConfig` /
`trl.DPOConfig` as it is, so any TRL field can be set from a recipe and a TRL upgrade needs no
change here. The project keeps only its opinions as code:

- `SFT_TRAINER_DEFAULTS` / `DPO_TRAINER_DEFAULTS`: defaults it chooses on purpose (each commented),
  under the recipe's `trainer:` keys;
- `MANAGED_KEYS`: what the step sets itself (where checkpoints go, the device, the seed, DeepSpeed)
  and a recipe may not;
- a few range checks TRL does not make (a negative learning rate trains "fine" and publishes junk).

The mapping is checked when the recipe loads, by building the TRL config: a misspelt key fails
before any work, naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from typing import Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from medcritical.core.section import Section

# Shared by SFT and DPO; TRL's default in brackets where the project's differs.
TRAINER_DEFAULTS: dict[str, Any] = {
    "lr_scheduler_type": "cosine",  # [linear] the schedule of the paper's runs
    "warmup_steps": 0.05,  # [0] a float below 1 is a share of the total steps
    "optim": "adamw_torch",  # [adamw_torch_fused] a plain torch optimizer also under DeepSpeed: nothing to compile
    "activation_checkpointing": False,  # [TRL: on] off for small models and CPU; the 7B recipes turn it on
    "save_steps": 100,  # [500] a resumable checkpoint this often (with optimizer state)
    "save_total_limit": 2,  # [all] a 7B full fine-tune checkpoint is ~100 GB
    "logging_steps": 10,
    "logging_first_step": True,
    "report_to": "none",  # no experiment tracker unless the recipe names one
    "disable_tqdm": False,
}
SFT_TRAINER_DEFAULTS: dict[str, Any] = TRAINER_DEFAULTS | {
    "learning_rate": 1e-4,  # [2e-5] LoRA r=8 as in the paper
    "num_train_epochs": 1.0,  # [3]
    "per_device_train_batch_size": 4,  # [8]
    "max_length": 2048,  # [1024] the paper's cutoff: long chains of thought
    "assistant_only_loss": True,  # [False] learn the teacher's reasoning and answer, not the prompt
}
DPO_TRAINER_DEFAULTS: dict[str, Any] = TRAINER_DEFAULTS | {
    # The paper's DPO: beta 0.3, lr 1e-5 cosine, warmup 0.05, batch 1 x 16, cutoff 2048, 10 epochs.
    "beta": 0.3,  # [0.1]
    "learning_rate": 1e-5,  # [1e-6]
    "num_train_epochs": 10.0,  # [3]
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 16,
    "max_length": 2048,  # [1024]
}
# Set by the step from the run (folder, device, seed) and the section's `deepspeed` key.
MANAGED_KEYS = frozenset({"output_dir", "use_cpu", "seed", "data_seed", "deepspeed", "push_to_hub"})
# Ranges TRL accepts but that cannot train: key -> (test, what is allowed).
_RANGES = {
    "learning_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "num_train_epochs": (lambda v: 0 < v <= 100_000, "in (0, 100000]"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "max_length": (lambda v: v is None or v >= 1, ">= 1"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use epochs) or >= 1"),
    "warmup_steps": (lambda v: v >= 0, ">= 0 (below 1: a share of the steps)"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v > 0, "> 0"),
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "save_steps": (lambda v: v > 0, "> 0"),
    "logging_steps": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "beta": (lambda v: 0 < v <= 100, "in (0, 100]"),
}


# Validation context key: the recipe was checked in full before (the pipeline's configure task), so the trainer
# mappings are not built into TRL's configs again (see recipe.load_recipe_text).
TRAINER_CHECKED = "trainer_checked"


def check_trainer_mapping(
    trainer: dict[str, Any], defaults: dict[str, Any], config_class: str, info: ValidationInfo | None = None
) -> dict[str, Any]:
    """Refuse managed keys and out-of-range values, then build the TRL config to catch the rest."""
    managed = sorted(MANAGED_KEYS & trainer.keys())
    if managed:
        raise ValueError(
            f"{', '.join(managed)} cannot be set here: the step sets them (output folder, device, run.seed, "
            "and the section's `deepspeed` key)"
        )
    if info is not None and (info.context or {}).get(TRAINER_CHECKED):
        return trainer
    import trl  # lazy: heavy (transformers, torch); only recipes with training sections pay for it

    config = getattr(trl, config_class)
    fields = {field.name: field for field in dataclasses.fields(config)}
    unknown = sorted(set(trainer) - fields.keys())
    if unknown:
        raise ValueError(
            f"{unknown[0]!r} is not a field of trl.{config_class} (misspelt? any field of TRL's "
            f"{config_class} and of transformers' TrainingArguments can be set here)"
        )
    trainer = {key: _typed(key, value, config) for key, value in trainer.items()}
    settings = defaults | trainer
    for key, (allowed, text) in _RANGES.items():
        value = settings.get(key)
        if isinstance(value, (int, float)) and not (math.isfinite(value) and allowed(value)):
            raise ValueError(f"{key} must be {text} (got {value!r})")
    # CPU stand-ins for the device-dependent keys: the values themselves are checked at the step.
    with tempfile.TemporaryDirectory() as scratch:
        try:
            config(**settings | {"output_dir": scratch, "use_cpu": True, "bf16": False, "fp16": False})
        except (TypeError, ValueError) as e:
            raise ValueError(f"trl.{config_class} refuses these settings: {e}") from None
    return trainer


def _typed(key: str, value: Any, config: type) -> Any:
    """`value` as the type TRL declares for `key` ("3e-3", which YAML reads as a string, becomes 0.003);
    TRL's dataclasses do not convert, and a string learning rate would fail deep inside torch."""
    hint = typing.get_type_hints(config).get(key)
    try:
        adapter = TypeAdapter(hint)
    except Exception:  # an annotation pydantic cannot read: TRL checks the value itself
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        raise ValueError(f"{key}: {value!r} is not a valid {_type_name(hint)} ({e.errors()[0]['msg']})") from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


class LoraSection(Section):
    enabled: bool = True
    r: int = Field(8, ge=1, le=65536)
    alpha: int = Field(16, ge=1, le=1_000_000)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" or a list of module names (Qwen2: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    target_modules: str | list[str] = "all-linear"
    # Save full weights with the adapter merged in (what rollout/vLLM load); the adapter is kept too.
    merge: bool = True


class SFTSection(Section):
    lora: LoraSection = LoraSection()
    # A DeepSpeed config: a bare name (zero2, zero3, zero2_offload, zero3_offload: recipes/deepspeed/<name>.json)
    # or a path to a .json file. None trains without DeepSpeed (one process, or plain DDP under torchrun).
    deepspeed: str | None = None
    # Passed to trl.SFTConfig as is, over SFT_TRAINER_DEFAULTS (learning_rate, num_train_epochs,
    # per_device_train_batch_size, gradient_accumulation_steps, max_length, packing, ...).
    trainer: dict[str, Any] = {}
    # Examples longer than trainer.max_length: "drop" them (counted in the metrics), or "truncate" them, which
    # cuts off the answer and its end-of-turn token and so teaches the model to ramble on without ending.
    on_too_long: Literal["drop", "truncate"] = "drop"
    # A rerun with the same output folder continues from the newest complete checkpoint.
    resume: bool = True
    # With an s3:// output the checkpoints are mirrored to <output>/checkpoints/ while training runs, for a new
    # pod to resume from; once the model is published they are removed (each holds the optimizer state: about
    # 100 GB at 7B full fine-tuning). true keeps them.
    keep_checkpoints: bool = False

    @field_validator("trainer")
    @classmethod
    def _trl_config(cls, trainer: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return check_trainer_mapping(trainer, SFT_TRAINER_DEFAULTS, "SFTConfig", info)

    @property
    def settings(self) -> dict[str, Any]:
        """The TRL arguments this section stands for: the project's defaults under the recipe's keys."""
        return SFT_TRAINER_DEFAULTS | self.trainer


class DPOSection(Section):
    lora: LoraSection = LoraSection()
    deepspeed: str | None = None  # as sft.deepspeed
    # Passed to trl.DPOConfig as is, over DPO_TRAINER_DEFAULTS (beta, loss_type, loss_weights,
    # precompute_ref_log_probs, learning_rate, num_train_epochs, max_length, ...). DPO plus an NLL term
    # on chosen (RPO-style): loss_type: [sigmoid, sft], loss_weights: [1.0, 1.0].
    trainer: dict[str, Any] = {}
    # Held-out evaluations over the whole run (reward accuracy and margin on pairs_heldout.jsonl).
    evaluations: int = Field(20, ge=1, le=100_000)
    # Evaluations without held-out margin improvement before stopping (transformers' EarlyStoppingCallback
    # on the margin); 0: off.
    early_stopping_patience: int = Field(3, ge=0, le=100_000)
    # At the end, load the checkpoint with the best held-out margin (a checkpoint is then saved at every
    # evaluation, replacing trainer.save_steps); off keeps the last step's weights.
    restore_best: bool = True
    resume: bool = True  # as sft.resume: a rerun into the same folder continues from the newest checkpoint
    keep_checkpoints: bool = False  # as sft.keep_checkpoints

    @field_validator("trainer")
    @classmethod
    def _trl_config(cls, trainer: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return check_trainer_mapping(trainer, DPO_TRAINER_DEFAULTS, "DPOConfig", info)

    @property
    def settings(self) -> dict[str, Any]:
        return DPO_TRAINER_DEFAULTS | self.trainer
