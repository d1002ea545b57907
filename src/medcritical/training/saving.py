"""Saving the trained model: Hugging Face folders that reload and generate, checked before the run counts as done.

Under ZeRO-3 every rank holds a slice of each weight; saving the in-memory model writes empty tensors (the known
"empty LoRA adapter" bug). Here the full state dict is gathered from all ranks first (a collective call, so
every rank enters `save_final_model`), rank 0 writes it, and the written files are checked for empty or
missing weights before the run counts as done.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import deepspeed as hf_deepspeed

from medcritical.errors import StepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedModel:
    model_dir: (
        Path  # full weights (merged when LoRA and merge), tokenizer, chat template; or the adapter when not merged
    )
    adapter_dir: Path | None  # the LoRA adapter alone (with the tokenizer), None for full fine-tuning
    merged: bool


def gathered_state_dict(trainer) -> dict:
    """The full state dict on rank 0 (other ranks get what DeepSpeed returns them). Every rank must call it."""
    if trainer.is_deepspeed_enabled:
        return trainer.accelerator.get_state_dict(trainer.deepspeed)
    return trainer.accelerator.get_state_dict(trainer.model)


def save_final_model(trainer, output_dir: str | Path, *, base_model_path: str | Path, merge: bool) -> SavedModel:
    """Write model/ (and adapter/ for LoRA) under output_dir. Call on every rank; rank 0 writes.

    LoRA with merge: the adapter is saved, then merged into a fresh copy of the base weights loaded from
    `base_model_path` (the in-memory base may be sharded or wrapped), and the merged model is saved in full.
    """
    output_dir = Path(output_dir)
    model_dir, adapter_dir = output_dir / "model", output_dir / "adapter"
    state_dict = gathered_state_dict(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_lora = isinstance(model, PeftModel)
    tokenizer = trainer.processing_class
    if trainer.is_world_process_zero():
        with _no_zero3_partitioning():
            _write_final_model(model, tokenizer, state_dict, model_dir, adapter_dir, base_model_path, is_lora, merge)
    trainer.accelerator.wait_for_everyone()
    return SavedModel(model_dir, adapter_dir if is_lora else None, merged=is_lora and merge)


def _write_final_model(model, tokenizer, state_dict, model_dir, adapter_dir, base_model_path, is_lora, merge):
    if is_lora:
        model.save_pretrained(adapter_dir, state_dict=state_dict)
        tokenizer.save_pretrained(adapter_dir)
        verify_adapter(adapter_dir)
        if merge:
            merged = merge_adapter(base_model_path, adapter_dir, dtype=_dtype_of(state_dict))
            merged.generation_config = model.generation_config
            merged.save_pretrained(model_dir)
        else:
            model.save_pretrained(model_dir, state_dict=state_dict)
    else:
        model.save_pretrained(model_dir, state_dict=state_dict)
    tokenizer.save_pretrained(model_dir)
    if not is_lora or merge:
        verify_full_weights(model_dir)
    log.info("saved the final model to %s", model_dir)


@contextmanager
def _no_zero3_partitioning():
    """Build models normally on rank 0 alone while a ZeRO-3 trainer exists.

    While a ZeRO-3 config is registered, transformers partitions every model it builds across the ranks (a
    collective call); rank 0 loading the base to merge, alone, would wait forever for the others.
    """
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter for the registered object
    registered = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered is not None:
            hf_deepspeed.set_hf_deepspeed_config(registered)


def _dtype_of(state_dict: dict):
    return next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)


def merge_adapter(base_model_path: str | Path, adapter_dir: str | Path, *, dtype=None):
    """Base weights + LoRA adapter folded into one plain transformers model (on CPU)."""
    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def verify_adapter(adapter_dir: str | Path) -> None:
    """The saved adapter holds LoRA weights and none of them is empty (the ZeRO-3 failure)."""
    adapter_dir = Path(adapter_dir)
    shapes = _tensor_shapes(adapter_dir)
    lora = {k: s for k, s in shapes.items() if "lora_" in k}
    empty = [k for k, s in lora.items() if 0 in s]
    if not lora or empty:
        raise StepError(
            f"{adapter_dir}: the saved LoRA adapter is {'empty' if not lora else f'missing data in {empty[:3]}'}; "
            'under ZeRO-3 the DeepSpeed config needs "stage3_gather_16bit_weights_on_model_save": true'
        )


def verify_full_weights(model_dir: str | Path) -> None:
    """Every weight the model's architecture expects is saved with its full shape (tied weights excepted)."""
    model_dir = Path(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    saved = _tensor_shapes(model_dir)
    missing = sorted(k for k in expected if k not in saved and k not in tied)
    wrong = sorted(k for k in expected if k in saved and saved[k] != expected[k])
    if missing or wrong:
        raise StepError(
            f"{model_dir}: the saved model is incomplete: {len(missing)} weights missing {missing[:3]}, "
            f"{len(wrong)} with the wrong shape {wrong[:3]}; under ZeRO-3 the DeepSpeed config needs "
            '"stage3_gather_16bit_weights_on_model_save": true'
        )
