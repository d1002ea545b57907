"""Recipes: one commented YAML file per run, validated on load.

Every knob a researcher turns is a key here with a sane default. Unknown keys, wrong types and
missing files are errors naming the key and the file. ``--set section.key=value`` overrides a key
from the command line (the value is parsed as YAML, so ``--set sft.lora.r=16`` is an int).

Each step owns its section's model (``DistillConfig`` lives with distillation, and so on); this
module only composes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from medcritical.distill.config import DistillConfig
from medcritical.errors import UserError
from medcritical.section import Section
from medcritical.selfplay.config import SelfPlayConfig
from medcritical.training.config import SFTSection

BUNDLED = "bundled"  # data.source value: the CMExam sample shipped inside the package
TINY = "tiny"  # model.base value: build the offline tiny model


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


class RunConfig(Section):
    name: str = "medcritical"
    # Where each step writes `<output_dir>/<step>/`; a local folder or s3://bucket/prefix.
    output_dir: str | None = None
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seed range
    # "auto" takes a CUDA GPU when there is one.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads for torch; None leaves torch's default. On small shared CPUs 1-2 is much faster.
    threads: int | None = Field(None, ge=1)

    @property
    def root(self) -> str:
        return self.output_dir or f"runs/{self.name}"


class DataConfig(Section):
    # "bundled" (400 CMExam val questions in the package) or a .csv/.xlsx/.jsonl path.
    source: str = BUNDLED
    # A separate evaluation file; when None, `eval_size` questions are split off `source`.
    eval_source: str | None = None
    eval_size: int = Field(100, ge=0)
    # Cap on training questions (None: all that remain after the split); chosen by seeded hash.
    train_size: int | None = Field(None, ge=0)
    # Bad rows (empty question, no options, answer not among options): skip and count, or stop.
    on_bad_row: Literal["skip", "error"] = "skip"
    # Training questions whose text also appears in the eval split: drop them, or stop.
    on_leakage: Literal["drop", "error"] = "drop"

    @field_validator("source", "eval_source")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value in (None, BUNDLED) or value.startswith("s3://") or Path(value).is_file():
            return value
        raise ValueError(f"no such file {value!r}")


class TinyModelConfig(Section):
    # A test model: the caps keep a typo from building a model that fills memory.
    vocab_size: int = Field(2048, ge=512, le=65536)  # the byte-level BPE needs its 256 bytes, the special tokens and merges
    hidden_size: int = Field(64, ge=1, le=4096)
    num_layers: int = Field(2, ge=1, le=64)
    num_heads: int = Field(4, ge=1, le=64)
    intermediate_size: int = Field(256, ge=1, le=16384)
    seed: int = Field(0, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads} (each head gets "
                "hidden_size / num_heads dimensions)"
            )
        return self


class ModelConfig(Section):
    # "tiny" (built offline into the run folder) or a local Hugging Face model folder.
    base: str = TINY
    tiny: TinyModelConfig = TinyModelConfig()
    # "auto": bfloat16 on a GPU that supports it, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("base")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        if value == TINY or value.startswith("s3://") or Path(value).is_dir():
            return value
        raise ValueError(f"no such model folder {value!r} (use 'tiny' or a local Hugging Face folder)")


class GenerationConfig(Section):
    """How the student generates, in evaluation and rollout."""

    backend: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    # vLLM only: GPUs per model replica, and the share of GPU memory it may take.
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)


class JudgeConfig(Section):
    """The paper's open-ended protocol: a judge model behind an OpenAI-compatible endpoint."""

    base_url: str | None = None  # e.g. http://judge:8000/v1; env MEDCRITICAL_JUDGE_BASE_URL
    model: str | None = None  # env MEDCRITICAL_JUDGE_MODEL
    api_key_env: str = "MEDCRITICAL_JUDGE_API_KEY"  # the key is read from this variable, never the recipe
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    max_tokens: int = 512  # room for a reasoning judge; the verdict is its last 正确/错误 (correct/incorrect)


class EvaluateConfig(Section):
    # mcq: options shown, letters graded. judge: no options, a judge grades the free answer.
    protocol: Literal["mcq", "judge"] = "mcq"
    # mcq only: "generate" (free text + the grader) or "loglik" (likelihood of each option letter;
    # single-answer questions only, multi-answer ones are still generated).
    scoring: Literal["generate", "loglik"] = "generate"
    language: Literal["zh", "en"] = "zh"
    limit: int | None = Field(None, ge=1)  # evaluate only the first N questions (quick checks)
    judge: JudgeConfig = JudgeConfig()


class Recipe(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    distill: DistillConfig = DistillConfig()
    sft: SFTSection = SFTSection()
    selfplay: SelfPlayConfig = SelfPlayConfig()


def apply_override(raw: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict, parsing value as YAML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {assignment!r}: expected key.sub=value, e.g. --set sft.lora.r=16")
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise RecipeError(
            f"--set {assignment!r}: the value {value!r} is not valid YAML ({problem}); quote a text value, "
            f"e.g. --set '{key.strip()}=\"{value}\"', or write a list as [a, b]"
        ) from None


def _format_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (misspelt? see recipes/demo.yaml for every key)")
        else:
            got = item.get("input")
            got = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"  {key}: {item['msg']}{got}")
    return "\n".join(lines)


def _validate(raw: Any, source: str, overrides: list[str] | tuple[str, ...]) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections (run:, data:, ...)")
    for assignment in overrides:
        apply_override(raw, assignment)
    if overrides:
        source += " with --set " + " ".join(overrides)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_error(source, e)) from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from e


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (or the defaults when path is None) and apply ``--set`` overrides."""
    if path is None:
        return _validate({}, "defaults", overrides)
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file (try recipes/demo.yaml)")
    return _validate(_parse_yaml(path.read_text(encoding="utf-8"), str(path)), str(path), overrides)


def load_recipe_text(text: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe from YAML text (the pipeline passes the resolved recipe to every step as text)."""
    return _validate(_parse_yaml(text, "recipe text"), "recipe text", overrides)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML: what a step records next to its outputs."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
