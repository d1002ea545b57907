"""Stage 1 training: supervised fine-tuning on the teacher's reasoning traces (TRL SFTTrainer).

The same command on a laptop CPU with the tiny model, and on GPUs with a 7B student; only the recipe and the
launcher change:

    # one process (CPU or one GPU)
    medcritical sft --recipe recipes/demo.yaml --dataset runs/demo/distill/sft.jsonl --model tiny --output runs/demo/sft

    # 8 GPUs on one node, DeepSpeed ZeRO-3 from the recipe (sft.deepspeed: zero3)
    torchrun --nproc_per_node 8 -m medcritical.cli sft --recipe recipes/full-zero3-8gpu.yaml --dataset ... --model ... --output ...

    # several nodes: the same, with the rendezvous from the environment (a PyTorchJob sets PET_* for torchrun)
    torchrun --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT -m medcritical.cli sft ...

    # or: accelerate launch --num_processes 8 -m medcritical.cli sft ...

Output folder: checkpoints/ (periodic; a rerun resumes from the newest; with an s3:// output also uploaded to
<output>/checkpoints/, where a new machine resumes from), model/ (Hugging Face folder with the
tokenizer and chat template; LoRA merged when sft.lora.merge), adapter/ (LoRA only), sft_metrics.json,
sft_loss.png, fingerprint.json (what the checkpoints and model were trained from: a rerun with other settings,
data or base weights is refused), _MANIFEST.json (size and sha256 of every file; written last, marks the run done).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from medcritical.core.values import number_text
from medcritical.training.checks import (
    PreTrainingCheckError,
    check_tokenizer,
    conversation_lengths,
    read_conversations,
    select_by_length,
)
from medcritical.training.common import lora_config, trainer_arguments
from medcritical.training.config import SFTSection
from medcritical.training.fingerprints import sft_fingerprint
from medcritical.training.lifecycle import TrainingRun
from medcritical.training.saving import SavedModel

log = logging.getLogger(__name__)


def train_sft(
    config: SFTSection,
    dataset_path: str | Path,
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
    """Fine-tune the model in `model_path` (a local HF folder) on the chat rows of `dataset_path`.

    Resumes from the newest checkpoint in output_dir/checkpoints (sft.resume), only for the same settings, data
    and base weights (`fingerprint.json`); `restart` discards what is there instead of refusing. Whether the
    folder already holds the finished run is the runner's to decide (runner.finished_stats), not this function's.
    `callbacks` are extra transformers TrainerCallbacks. `output_uri` is where the runner publishes output_dir:
    when it is an s3:// URI, every checkpoint is also uploaded to <output_uri>/checkpoints/, and a new machine
    resumes from there (training/remote_checkpoints.py). The steps are `lifecycle.TrainingRun`'s.
    """
    options = dict(device=device, dtype=dtype, seed=seed, callbacks=callbacks, restart=restart, output_uri=output_uri)
    return SFTRun(config, dataset_path, model_path, output_dir, **options).run()


class SFTRun(TrainingRun):
    """What SFT provides to the training lifecycle: chat rows checked against the tokenizer, TRL's SFTTrainer."""

    step = "sft"

    def __init__(self, config: SFTSection, dataset_path: str | Path, model_path, output_dir, **options):
        super().__init__(config, model_path, output_dir, **options)
        self.dataset_path = dataset_path

    def prepare(self) -> None:
        settings = self.config.settings
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.facts = check_tokenizer(
            self.tokenizer, str(self.model_path), assistant_only_loss=settings["assistant_only_loss"]
        )
        conversations = read_conversations(self.dataset_path)
        lengths = conversation_lengths(self.tokenizer, conversations, self.facts.training_template)
        self.conversations, self.data_stats = select_by_length(
            conversations, lengths, settings["max_length"], self.config.on_too_long, str(self.dataset_path)
        )

    def fingerprint(self) -> dict[str, Any]:
        return sft_fingerprint(self.config, self.dataset_path, self.model_path, self.seed)

    def data(self) -> None:
        self.rows = training_rows(self.conversations, self.facts, str(self.dataset_path))
        self.settings = self.config.settings
        if self.facts.prompt_completion:  # TRL masks the prompt itself: loss on the assistant's reply only, as asked
            self.settings = self.settings | {"assistant_only_loss": False, "completion_only_loss": True}

    def arguments(self, checkpoints: Path, resume_from: str | None):
        return SFTConfig(
            **trainer_arguments(
                self.settings, checkpoints, device=self.device, seed=self.seed, deepspeed=self.deepspeed
            )
        )

    def build_trainer(self, model, args, callbacks: list[Any]):
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(self.rows),
            processing_class=self.tokenizer,
            peft_config=lora_config(self.config.lora),
            callbacks=callbacks,
        )

    def metrics(self, trainer, args, saved: SavedModel, resume_from: str | None, training: dict) -> dict[str, Any]:
        return {
            "step": "sft",
            **self.data_stats,
            "device": self.device,
            "deepspeed": self.deepspeed.name if self.deepspeed else None,
            "zero_stage": self.zero_stage,
            "lora": self.config.lora.enabled,
            "merged": saved.merged,
            "packing": args.packing,
            "end_of_turn_token": self.facts.end_of_turn,
            "pad_token": self.tokenizer.pad_token,
            "rows": "prompt-completion" if self.facts.prompt_completion else "messages",
            "resumed_from": Path(resume_from).name if resume_from else None,
            "model_dir": saved.model_dir.name,
            "adapter_dir": saved.adapter_dir.name if saved.adapter_dir else None,
            **training,
        }

    def log_done(self, metrics: dict[str, Any], saved: SavedModel) -> None:
        log.info(
            "SFT done: %d steps, loss %s -> %s, %s tokens/s; model in %s",
            metrics["steps"],
            number_text(metrics["loss_first"]),
            number_text(metrics["loss_last"]),
            number_text(metrics["tokens_per_second"]),
            saved.model_dir,
        )


def training_rows(conversations: list[list[dict]], facts, source: str) -> list[dict]:
    """The trainer's rows: whole conversations ("messages"), or (prompt, completion) when the chat template
    cannot mark the assistant's text (`TokenizerFacts.prompt_completion`); that needs one reply, at the end."""
    if not facts.prompt_completion:
        return [{"messages": c} for c in conversations]
    bad = [
        i
        for i, c in enumerate(conversations)
        if [m["role"] for m in c].count("assistant") != 1 or c[-1]["role"] != "assistant"
    ]
    if bad:
        raise PreTrainingCheckError(
            f"{source}: {len(bad)} conversations have more than one assistant turn, or do not end with one (first: "
            f"row {bad[0] + 1}); this model's chat template has no {{% generation %}} markers and TRL has no training "
            "version of it, so only (prompt, reply) rows can limit the loss to the reply. Keep one final assistant "
            "turn per row, or set sft.trainer.assistant_only_loss: false (loss on the prompt too)"
        )
    return [{"prompt": c[:-1], "completion": c[-1:]} for c in conversations]
