"""Arguments every step shares: the recipe and its overrides."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator

from medcritical.recipe import Recipe, load_recipe


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="YAML", help="recipe file (e.g. recipes/demo.yaml); defaults when omitted")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a recipe key, e.g. --set sft.lora.r=16 (repeatable; value parsed as YAML)",
    )


def add_restart_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the outputs in --output made from other inputs, settings or weights and start over "
        "(without it such a folder is an error; outputs of the same work are always resumed)",
    )


@contextlib.contextmanager
def questions_uri(given: str | None, recipe: Recipe) -> Iterator[str]:
    """A question file or prepare-data folder as given (path or s3:// URI); without one, the recipe's
    data section prepared into a temporary folder (its train.jsonl and eval.jsonl)."""
    if given:
        yield given
        return
    from medcritical.data.prepare import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(recipe.data, recipe.run.seed, tmp)
        yield tmp


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe, validated; a --model folder checked too, before any data is prepared."""
    recipe = load_recipe(args.recipe, args.overrides)
    if getattr(args, "model", None):
        from medcritical.staging import check_model_uri

        check_model_uri(args.model)
    recipe.run.apply_threads()
    return recipe
