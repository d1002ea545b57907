"""What every training step shares (SFT here, DPO next): device and precision, the trainer arguments common to
TRL's SFTConfig and DPOConfig, LoRA, DeepSpeed configs, distributed start-up and resuming.

One command runs as a single process or under `torchrun` / `accelerate launch` on many GPUs and nodes: rank,
world size and rendezvous come from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK, as
torchrun and the Kubernetes training operators set them), never from our own flags.

torch, transformers, peft and DeepSpeed are imported inside the functions that need them: `medcritical plan`
reads this module's DeepSpeed names without paying for the training libraries.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medcritical.core.shipped import deepspeed_dir
from medcritical.errors import InputError, MissingInputError
from medcritical.io.fingerprint import check_resume
from medcritical.io.manifest import MANIFEST_NAME
from medcritical.io.ranks import is_main_process
from medcritical.modeling.generation import resolve_device, resolve_dtype
from medcritical.training.config import LoraSection

log = logging.getLogger(__name__)

DEEPSPEED_NAMES = ("zero2", "zero3", "zero2_offload", "zero3_offload")


def training_device(device: str) -> str:
    """ "cpu" or "cuda" ("auto" takes a GPU when one is visible)."""
    return resolve_device(device)


def training_dtype(dtype: str, device: str):
    """The dtype weights are loaded in: bfloat16 on a GPU that has it, float32 on CPU (unless the recipe says)."""
    return resolve_dtype(dtype, device)


def deepspeed_config_path(value: str | None) -> Path | None:
    """The DeepSpeed JSON for a section's `deepspeed` key: a path to a .json file, or a bare name from recipes/deepspeed/."""
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        return path.resolve()
    if value in DEEPSPEED_NAMES:
        # The working directory's recipes/deepspeed/ first (a user's own copy), then the shipped one.
        for folder in (Path("recipes") / "deepspeed", deepspeed_dir()):
            if (folder / f"{value}.json").is_file():
                return (folder / f"{value}.json").resolve()
    raise MissingInputError(
        f"deepspeed: no DeepSpeed config {value!r}; give a path to a .json file or one of "
        f"{', '.join(DEEPSPEED_NAMES)} (the files in recipes/deepspeed/)"
    )


def deepspeed_zero_stage(path: Path | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config, checked for what saving the final model needs."""
    if path is None:
        return None
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    zero = settings.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        # Without it the weights stay sharded across ranks and the saved model would be empty.
        raise InputError(
            f'{path}: ZeRO stage 3 needs "stage3_gather_16bit_weights_on_model_save": true in zero_optimization, '
            "or the final model cannot be gathered and saved (see recipes/deepspeed/zero3.json)"
        )
    return stage


@contextmanager
def distributed_group(device: str, deepspeed: Path | None) -> Iterator[None]:
    """The process group a trainer needs, for the length of the `with` block.

    DeepSpeed needs one even for a single process: when no launcher set the rendezvous variables, they are set
    for a world of one. On CPU DeepSpeed must use gloo, and with ZeRO-3 the group must exist before the model is
    loaded (the weights are partitioned as they load). The environment is put back on the way out: what this
    block and the libraries set in it (the rendezvous, transformers' ACCELERATE_USE_DEEPSPEED) would otherwise
    reach every process started later (a KFP local step, a vLLM engine), which would then start DeepSpeed
    unasked or rendezvous on a port this process still holds.
    """
    before = dict(os.environ)
    try:
        if deepspeed is not None:
            if "WORLD_SIZE" not in os.environ:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    free_port = s.getsockname()[1]
                rendezvous = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
                for key, value in rendezvous.items():
                    os.environ.setdefault(key, value)
                os.environ.setdefault("MASTER_PORT", str(free_port))
            import deepspeed as ds  # lazy: heavy, and only DeepSpeed runs need it

            ds.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


def trainer_arguments(
    settings: dict[str, Any], checkpoints_dir: str | Path, *, device: str, seed: int, deepspeed: Path | None
) -> dict[str, Any]:
    """Keyword arguments for trl.SFTConfig / trl.DPOConfig: the section's `settings` (the recipe's
    `trainer:` over the project's defaults) plus what the step manages itself.

    bf16 mixed precision on a GPU that has it unless the recipe says otherwise; float32 on CPU
    (`use_cpu`); checkpoints with optimizer state so a rerun resumes exactly; no hub.
    """
    import torch  # lazy: see the module docstring

    on_gpu = device == "cuda"
    device_defaults = {"bf16": on_gpu and torch.cuda.is_bf16_supported()}
    managed = {
        "output_dir": str(checkpoints_dir),
        "use_cpu": not on_gpu,
        "deepspeed": str(deepspeed) if deepspeed else None,
        "seed": seed,
        "data_seed": seed,
        "push_to_hub": False,
    }
    if not on_gpu:
        managed.update(bf16=False, fp16=False)  # mixed precision needs a GPU
    return device_defaults | settings | managed


def lora_config(lora: LoraSection):
    """A peft.LoraConfig for a causal LM, or None when LoRA is off (full fine-tuning)."""
    if not lora.enabled:
        return None
    from peft import LoraConfig  # lazy: LoRA runs only

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_model_for_training(model_path: str | Path, device: str, dtype: str = "auto"):
    """Load the model to train. Call after building the trainer config: with ZeRO-3 the weights are then
    partitioned across ranks while loading instead of materialised whole on every rank."""
    from transformers import AutoModelForCausalLM  # lazy: see the module docstring

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=training_dtype(dtype, device))
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def stop_on_token(model, token_id: int) -> None:
    """Make generation stop on `token_id` (the assistant's end-of-turn token) in the saved generation config.

    Base models often stop only on their document end (e.g. <|endoftext|>) while the chat template ends a turn
    with another token (<|im_end|>); the trained model would then write past its answer.
    """
    config = model.generation_config
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if token_id not in eos:
        log.info("generation will also stop on the end-of-turn token id %d (was %s)", token_id, eos or "none")
        config.eos_token_id = [*eos, token_id] if eos else token_id


CHECKPOINT_PREFIX = "checkpoint-"  # the trainer's checkpoint folders: checkpoint-<global step>


def checkpoint_step(name: str) -> int | None:
    """N of a `checkpoint-N` folder name; None for any other name."""
    step = name.removeprefix(CHECKPOINT_PREFIX)
    return int(step) if name.startswith(CHECKPOINT_PREFIX) and step.isdigit() else None


def newest_checkpoints_first(names) -> list[str]:
    """The `checkpoint-N` names among `names`, highest N first."""
    return sorted((n for n in names if checkpoint_step(n) is not None), key=checkpoint_step, reverse=True)


def find_resumable_checkpoint(checkpoints_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` folder (trainer_state.json is written last), or None.

    A run killed while saving leaves a checkpoint without it; that one is skipped, not resumed from.
    """
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return None
    for name in newest_checkpoints_first(p.name for p in folder.iterdir() if p.is_dir()):
        checkpoint = folder / name
        if (checkpoint / "trainer_state.json").is_file():
            return str(checkpoint)
        log.warning(
            "%s is incomplete (no trainer_state.json, the run was probably killed while saving); skipped", checkpoint
        )
    return None


# What a training step's fingerprint vouches for: what a rerun resumes (checkpoints/) or returns at once (the
# finished model, whose manifest is written last). The metrics and plots are rewritten by every run.
RESUMED_OUTPUTS = ("checkpoints", "model", "adapter", MANIFEST_NAME)


def check_training_resume(output_dir: str | Path, fingerprint: dict[str, Any], *, restart: bool = False) -> bool:
    """`io.fingerprint.check_resume` for a training step: checkpoints of one recipe, data or starting
    model are never continued under another. On a mismatch `restart` discards them; otherwise the error
    names what changed and the fix (--restart). Every rank checks,
    only the main process records and discards. True when earlier checkpoints or the model may be resumed.
    """
    return check_resume(
        output_dir,
        fingerprint,
        outputs=RESUMED_OUTPUTS,
        restart=restart,
        write=is_main_process(),
    )
