"""A model folder checked before any work uses it: what `from_pretrained` would otherwise discover
minutes later, deep inside transformers, with a traceback.

`check_model_folder` refuses, naming the file and the fix: a config.json that is not a JSON object,
has no or an unknown `model_type`; a tokenizer that does not load or has no chat template; no weights,
a weight shard the index names but the folder lacks, a safetensors file that is truncated or whose
header is damaged; and files that no longer match the folder's manifest (io.manifest.check_integrity).
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from medcritical.errors import InputError
from medcritical.io.manifest import MANIFEST_NAME, check_integrity

log = logging.getLogger(__name__)

_checked: dict[tuple, None] = {}  # folders already checked in this process, by path and file stats


class ModelFolderError(InputError):
    """A model folder that cannot be loaded; the message names the file and the fix."""


def check_model_folder(folder: str | Path) -> None:
    """Raise `ModelFolderError` unless `folder` holds a loadable Hugging Face causal LM with a chat template."""
    folder = Path(folder)
    key = _signature(folder)
    if key in _checked:
        return
    if (folder.parent / MANIFEST_NAME).is_file() and not (folder / MANIFEST_NAME).is_file():
        check_integrity(folder.parent, under=folder.name)  # a training step's folder: model/ beside its manifest
    else:
        check_integrity(folder)
    _check_config(folder)
    _check_weights(folder)
    _check_tokenizer(folder)
    _checked[key] = None


def _signature(folder: Path) -> tuple:
    try:
        return (str(folder.resolve()),) + tuple(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
        )
    except OSError:
        return (str(folder),)


def _check_config(folder: Path) -> None:
    path = folder / "config.json"
    fix = "restore the model's config.json (copy it again from where the model came from)"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{path}: no such file; a Hugging Face model folder has config.json: {fix}") from None
    except UnicodeDecodeError:
        raise ModelFolderError(f"{path}: not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path}: not a JSON object; {fix}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelFolderError(f'{path}: no model_type (e.g. "qwen2"); {fix}')
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelFolderError(
            f"{path}: model_type {model_type!r} is not one transformers knows (e.g. qwen2, llama); check the "
            "spelling, or use a transformers version that has it"
        )


def _check_weights(folder: Path) -> None:
    safetensors = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelFolderError(f"{index}: not a weight index (no weight_map); copy the model again") from None
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                raise ModelFolderError(
                    f"{folder / missing[0]}: the weight shard {index_name} names is missing "
                    f"({len(missing)} of {len(shards)} shards); copy the model again"
                )
    if not safetensors and not bins:
        raise ModelFolderError(
            f"{folder}: no weights (*.safetensors or pytorch_model*.bin); copy the model's weight files into it"
        )
    for path in safetensors:
        _check_safetensors(path)
    for path in bins:
        if path.stat().st_size == 0:
            raise ModelFolderError(f"{path}: empty weight file; copy the model again")


def _check_safetensors(path: Path) -> None:
    """The header parses and the file holds every byte the header's tensors span (a truncated copy
    fails here, not after minutes of loading)."""
    size = path.stat().st_size
    fix = "the file is damaged or truncated (an interrupted copy?); copy the model again"
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ModelFolderError(f"{path}: not a readable safetensors file; {fix}") from None
    if 8 + length + end > size:
        raise ModelFolderError(f"{path}: {size} bytes, but its tensors need {8 + length + end}; {fix}")


def _check_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - whatever fails, the folder's tokenizer files are the cause
        log.debug("tokenizer of %s failed to load", folder, exc_info=True)
        raise ModelFolderError(
            f"{folder}: the tokenizer does not load ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "the folder needs the model's tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)"
        ) from None
    try:
        empty = len(tokenizer) == 0 or not tokenizer("答案 answer")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot tokenize is as good as none
        empty = True
    if empty:  # transformers builds an empty tokenizer when the files are missing
        raise ModelFolderError(
            f"{folder}: no tokenizer (the tokenizer is empty: tokenizer.json or tokenizer.model is missing); "
            "copy the model's tokenizer files into the folder"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ModelFolderError(
            f"{folder}: the tokenizer has no chat template; add the model's chat_template.jinja (or "
            "chat_template in tokenizer_config.json): the steps prompt the model in its chat format"
        )
