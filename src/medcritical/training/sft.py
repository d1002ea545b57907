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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from medcritical.io.manifest import write_manifest
from medcritical.training.checks import (
    PreTrainingCheckError,
    check_tokenizer,
    conversation_lengths,
    read_conversations,
    select_by_length,
)
from medcritical.training.common import (
    check_training_resume,
    deepspeed_config_path,
    deepspeed_zero_stage,
    distributed_group,
    find_resumable_checkpoint,
    load_model_for_training,
    lora_config,
    stop_on_token,
    trainer_arguments,
    training_device,
)
from medcritical.training.config import SFTSection
from medcritical.training.fingerprints import sft_fingerprint
from medcritical.training.metrics import ThroughputCallback, summarize_training, write_metrics
from medcritical.training.remote_checkpoints import checkpoint_callbacks, fetch_checkpoint, remote_checkpoints_uri
from medcritical.training.saving import save_final_model
from medcritical.values import number_text

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
    folder already holds the finished run is the runner's to decide (runner.finished_stats). `callbacks` are extra
    transformers TrainerCallbacks. `output_uri` is where the runner publishes output_dir: when it is an s3:// URI,
    every checkpoint is also uploaded to <output_uri>/checkpoints/, and a new machine resumes from there
    (training/remote_checkpoints.py).
    """
    output_dir, model_path = Path(output_dir), Path(model_path)
    device = training_device(device)
    settings = config.settings
    deepspeed = deepspeed_config_path(config.deepspeed)
    zero_stage = deepspeed_zero_stage(deepspeed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    facts = check_tokenizer(tokenizer, str(model_path), assistant_only_loss=settings["assistant_only_loss"])
    conversations = read_conversations(dataset_path)
    lengths = conversation_lengths(tokenizer, conversations, facts.training_template)
    conversations, data_stats = select_by_length(
        conversations, lengths, settings["max_length"], config.on_too_long, str(dataset_path)
    )
    fingerprint = sft_fingerprint(config, dataset_path, model_path, seed)
    resumable = check_training_resume(output_dir, fingerprint, restart=restart)
    remote = remote_checkpoints_uri(output_uri, deepspeed=deepspeed is not None)

    rows = training_rows(conversations, facts, str(dataset_path))
    if facts.prompt_completion:  # TRL masks the prompt itself: loss on the assistant's reply only, as asked
        settings = settings | {"assistant_only_loss": False, "completion_only_loss": True}
    with distributed_group(device, deepspeed):
        # The config comes before the model: under ZeRO-3 it makes from_pretrained load the weights partitioned.
        args = SFTConfig(
            **trainer_arguments(settings, output_dir / "checkpoints", device=device, seed=seed, deepspeed=deepspeed)
        )
        if remote and config.resume:  # on a new machine: the newest checkpoint the pod before it uploaded
            resumable = fetch_checkpoint(args, remote, fingerprint, restart=restart) is not None
        model = load_model_for_training(model_path, device, dtype)
        stop_on_token(model, facts.end_of_turn_id)
        throughput = ThroughputCallback()
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(config.lora),
            callbacks=[throughput, *checkpoint_callbacks(remote, fingerprint), *callbacks],
        )
        resume_from = find_resumable_checkpoint(args.output_dir) if resumable and config.resume else None
        if resume_from:
            log.info("resuming from %s", resume_from)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume_from)
        wall_seconds = time.perf_counter() - started

        saved = save_final_model(trainer, output_dir, base_model_path=model_path, merge=config.lora.merge)
        metrics = {
            "step": "sft",
            **data_stats,
            "device": device,
            "deepspeed": deepspeed.name if deepspeed else None,
            "zero_stage": zero_stage,
            "lora": config.lora.enabled,
            "merged": saved.merged,
            "packing": args.packing,
            "end_of_turn_token": facts.end_of_turn,
            "pad_token": tokenizer.pad_token,
            "rows": "prompt-completion" if facts.prompt_completion else "messages",
            "resumed_from": Path(resume_from).name if resume_from else None,
            "model_dir": saved.model_dir.name,
            "adapter_dir": saved.adapter_dir.name if saved.adapter_dir else None,
            **summarize_training(trainer, throughput, wall_seconds=wall_seconds),
        }
        if trainer.is_world_process_zero():
            files = [saved.model_dir, *write_metrics(output_dir, "sft", metrics)]
            write_manifest(output_dir, files + ([saved.adapter_dir] if saved.adapter_dir else []))
            log.info(
                "SFT done: %d steps, loss %s -> %s, %s tokens/s; model in %s",
                metrics["steps"],
                number_text(metrics["loss_first"]),
                number_text(metrics["loss_last"]),
                number_text(metrics["tokens_per_second"]),
                saved.model_dir,
            )
        trainer.accelerator.wait_for_everyone()
        return metrics


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
