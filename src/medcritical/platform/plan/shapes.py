"""A model's shape (layers, widths, vocabulary) from its config.json, the recipe's tiny model, or a table of
known shapes for models stored where the plan cannot read them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medcritical.errors import InputError, MissingInputError
from medcritical.orchestration.recipe import TINY, Recipe
from medcritical.platform.plan.units import PlanError


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer (Qwen2 family) that memory and disk depend on."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool = False
    context: int = 32_768  # max_position_embeddings: vLLM's context unless generation.max_model_len is set

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def parameters(self) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        attention = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k and v (bias), o
        mlp = 3 * h * i  # gate, up, down (SwiGLU)
        layer = attention + mlp + 2 * h  # two RMSNorms
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embeddings + h

    def lora_parameters(self, r: int) -> int:
        """LoRA on every linear layer (target_modules all-linear): r x (in + out) per layer."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        per_layer = (h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h)
        return self.num_layers * r * per_layer

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.kv_dim * dtype_bytes


# The paper's models, from their config.json on the Hugging Face hub (Qwen/Qwen2.5-7B-Instruct, Qwen/QwQ-32B).
KNOWN_SHAPES = {
    "Qwen2.5-7B-Instruct": ModelShape("Qwen2.5-7B-Instruct", 152_064, 3584, 18_944, 28, 28, 4, context=32_768),
    "QwQ-32B": ModelShape("QwQ-32B", 152_064, 5120, 27_648, 64, 40, 8, context=40_960),
}


def shape_from_config(config: dict, name: str) -> ModelShape:
    try:
        return ModelShape(
            name=name,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            context=int(config.get("max_position_embeddings") or 32_768),
        )
    except KeyError as e:
        raise PlanError(f"{name}: config.json has no {e.args[0]!r}; is it a decoder-only (Qwen2/Llama) model?") from e


def model_shape(uri: str | None, recipe: Recipe, model_config: str | Path | None = None) -> ModelShape:
    """The shape of the model at `uri` ("tiny", a local folder or s3://), without loading weights."""
    if model_config:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingInputError(
                f"--model-config {path}: no such file; give a model's config.json or its folder"
            ) from None
        except ValueError as e:  # not JSON, or not UTF-8
            raise InputError(f"--model-config {path}: not a JSON config ({e}); give the model's config.json") from None
        if not isinstance(config, dict):
            raise InputError(f"--model-config {path}: not a JSON object; give the model's config.json")
        return shape_from_config(config, str(model_config))
    uri = uri or recipe.model.base
    if uri == TINY:
        tiny = recipe.model.tiny
        return ModelShape(
            TINY,
            tiny.vocab_size,
            tiny.hidden_size,
            tiny.intermediate_size,
            tiny.num_layers,
            tiny.num_heads,
            tiny.num_heads,
            tie_embeddings=True,
        )
    local = Path(uri) / "config.json"
    if "://" not in uri and local.is_file():
        return shape_from_config(json.loads(local.read_text(encoding="utf-8")), uri)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    raise PlanError(
        f"{uri}: cannot read this model's config.json from here; pass --model-config PATH (its config.json) "
        f"or name a model of known shape ({', '.join(KNOWN_SHAPES)})"
    )
