"""Arguments every step shares: the recipe and its overrides."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator

from medcritical.orchestration.recipe import Recipe, load_recipe


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


@contextlib.contextmanager
def training_questions_uri(given: str | None, recipe: Recipe) -> Iterator[str]:
    """`questions_uri` for a step that trains or distils on the questions (distill, rollout, selfplay).
    A prepare-data folder (its data_stats.json beside train.jsonl) was checked for leakage when it was
    made; a question file given straight is checked here, against the evaluation questions the
    recipe's data section makes (`check_given_questions`): leaked questions dropped into a temporary
    train.jsonl, or an error (data.on_leakage), or a loud warning when it cannot be checked."""
    if not given:
        with questions_uri(given, recipe) as uri:
            yield uri
        return
    from pathlib import Path

    from medcritical.data.cmexam import load_questions, write_questions
    from medcritical.data.prepare import STATS_FILE, TRAIN_FILE, check_given_questions
    from medcritical.orchestration.staging import input_file, local_input

    folder = local_input(given)
    if folder.is_dir() and (folder / STATS_FILE).is_file():
        yield given
        return
    questions = load_questions(input_file(given, TRAIN_FILE), recipe.data.on_bad_row).questions
    kept = check_given_questions(questions, recipe.data, recipe.run.seed, given)
    if len(kept) == len(questions):
        yield given
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_questions(kept, Path(tmp) / TRAIN_FILE)
        yield tmp


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe, validated; a --model folder checked too, before any data is prepared."""
    recipe = load_recipe(args.recipe, args.overrides)
    if getattr(args, "model", None):
        from medcritical.orchestration.staging import check_model_uri

        check_model_uri(args.model)
    recipe.run.apply_threads()
    return recipe
