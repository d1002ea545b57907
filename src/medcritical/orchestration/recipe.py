"""Recipes: one commented YAML file per run, validated on load.

Every knob a researcher turns is a key here with a sane default. Unknown keys, wrong types and
missing files are errors naming the key and the file. ``--set section.key=value`` overrides a key
from the command line (the value is parsed as YAML, so ``--set sft.lora.r=16`` is an int).

Each stage owns its section's model (``DataSection`` in ``data/config.py``, ``DistillSection`` in
``distill/config.py``, and so on); this module only assembles them and runs the loading rules.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from medcritical.core import values
from medcritical.core.section import Section, check_output_uri
from medcritical.data.config import BUNDLED, DataSection
from medcritical.distill.config import DistillSection
from medcritical.errors import UserError
from medcritical.evaluation.config import EvaluateSection, JudgeSection
from medcritical.modeling.config import TINY, GenerationSection, ModelSection, TinyModelSection
from medcritical.selfplay.config import SelfPlaySection
from medcritical.training.config import TRAINER_CHECKED, SFTSection

# Re-exported: the sections live with the stage that owns them; a recipe only assembles them.
__all__ = [
    "BUNDLED",
    "TINY",
    "DataSection",
    "DistillSection",
    "EvaluateSection",
    "GenerationSection",
    "JudgeSection",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "RunSection",
    "SFTSection",
    "SelfPlaySection",
    "TinyModelSection",
    "apply_override",
    "dump_recipe",
    "load_recipe",
    "load_recipe_text",
]


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


class RunSection(Section):
    name: str = "medcritical"
    # Where each step writes `<output_dir>/<step>/`; a local folder or s3://bucket/prefix.
    output_dir: str | None = None
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seed range
    # "auto" takes a CUDA GPU when there is one.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # GPUs per training pod the recipe is written for: the default of the compiled pipeline's train_gpus
    # and of `medcritical plan --train-gpus`. The global batch does not depend on it (the runner divides
    # the gradient accumulation by the world size).
    train_gpus: int = Field(1, ge=1, le=64)
    # CPU threads for torch; None leaves torch's default. On small shared CPUs 1-2 is much faster.
    threads: int | None = Field(None, ge=1, le=4096)

    @field_validator("output_dir")
    @classmethod
    def _usable_output(cls, value: str | None) -> str | None:
        return None if value is None else check_output_uri(value)

    def apply_threads(self) -> None:
        """Give torch `threads` CPU threads in this process, without importing torch for a step that needs none:
        torch, once imported, is set directly; before that, OpenMP's variables are what it starts with."""
        if not self.threads:
            return
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(self.threads)
        else:
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(self.threads)

    @property
    def root(self) -> str:
        return self.output_dir or f"runs/{self.name}"


class Recipe(Section):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    generation: GenerationSection = GenerationSection()
    evaluate: EvaluateSection = EvaluateSection()
    distill: DistillSection = DistillSection()
    sft: SFTSection = SFTSection()
    selfplay: SelfPlaySection = SelfPlaySection()


def apply_override(raw: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict, parsing value as YAML."""
    key, value = values.assignment(
        assignment, option="--set", form="key.sub=value", example="sft.lora.r=16", error=RecipeError
    )
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.load(value, Loader=_UniqueKeyLoader) if value.strip() else None  # noqa: S506
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise RecipeError(
            f"--set {assignment!r}: the value {value!r} is not valid YAML ({problem}); quote a text value, "
            f"e.g. --set '{key}=\"{value}\"', or write a list as [a, b]"
        ) from None


def _format_error(source: str, error: ValidationError) -> str:
    """One sentence per problem, on one line: the recipe, the key, what is wrong and what was given."""
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key (misspelt? see recipes/demo.yaml for every key)")
        else:
            got = item.get("input")
            got = f" (got {got!r})" if not isinstance(got, dict) else ""
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {message}{got}")
    return f"{source}: invalid recipe: " + "; ".join(problems)


def _validate(raw: Any, source: str, overrides: list[str] | tuple[str, ...], checked: bool = False) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections (run:, data:, ...), not a {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    if overrides:
        source += " with --set " + " ".join(overrides)
    try:
        return Recipe.model_validate(raw, context={TRAINER_CHECKED: checked})
    except ValidationError as e:
        raise RecipeError(_format_error(source, e)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML with unique keys: a key given twice in one mapping is an error, not "the last one wins"."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first != line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice (lines {first} and {line}); keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and start is not None:  # where the unclosed bracket or quote opened
            problem += f" ({context} at line {start.line + 1})"
        raise RecipeError(f"{source}: not valid YAML{where}: {problem}; fix the recipe there") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (or the defaults when path is None) and apply ``--set`` overrides."""
    if path is None:
        return _validate({}, "defaults", overrides)
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder, not a recipe file; give a .yaml file (e.g. recipes/demo.yaml)")
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file (try recipes/demo.yaml)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: not UTF-8 text (line {line}, byte {e.start}); save the recipe as UTF-8 "
            "(e.g. iconv -f GBK -t UTF-8)"
        ) from None
    if not text.strip() or all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()):
        raise RecipeError(
            f"{path}: the recipe is empty; leave --recipe out for the defaults, or start from recipes/demo.yaml"
        )
    return _validate(_parse_yaml(text, str(path)), str(path), overrides)


def load_recipe_text(text: str, overrides: list[str] | tuple[str, ...] = (), *, checked: bool = False) -> Recipe:
    """A recipe from YAML text (the pipeline passes the resolved recipe to every step as text).

    `checked`: the text is a recipe already validated in full (the pipeline's `configure` output), so its trainer
    settings are not built into TRL's configs again: importing TRL (and torch) costs each pipeline task seconds,
    and the training steps build those configs anyway. Every other check still runs."""
    return _validate(_parse_yaml(text, "recipe text"), "recipe text", overrides, checked)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML: what a step records next to its outputs."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
