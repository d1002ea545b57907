"""`medcritical prepare-data` and `medcritical build-tiny-model`."""

from __future__ import annotations

from medcritical.cli.common import add_recipe_arguments, recipe_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare-data",
        help="load CMExam, split train/eval, check leakage",
        description=(
            "Load the CMExam file named by data.source (official .csv, the .xlsx export, or .jsonl; "
            "'bundled' is the 400-question sample shipped in the package), report bad rows, split "
            "off the evaluation set deterministically and drop training questions that leak into it. "
            "Writes train.jsonl, eval.jsonl and data_stats.json."
        ),
    )
    add_recipe_arguments(parser)
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder (or s3:// URI) for train.jsonl, eval.jsonl, data_stats.json",
    )
    parser.set_defaults(func=_prepare)

    tiny = subparsers.add_parser(
        "build-tiny-model",
        help="build the offline tiny Qwen2-style model",
        description="Build a tiny random Qwen2-style model with a byte-level BPE tokenizer and ChatML "
        "template, offline and deterministically (settings from model.tiny in the recipe).",
    )
    add_recipe_arguments(tiny)
    tiny.add_argument("--output", required=True, metavar="DIR", help="folder for the Hugging Face model")
    tiny.set_defaults(func=_build_tiny)


def _prepare(args) -> None:
    from medcritical.data.stage import PREPARE_DATA
    from medcritical.orchestration.runner import run_stage

    stats = run_stage(PREPARE_DATA, recipe_from_args(args), args.output)
    print(f"train {stats['train']}, eval {stats['eval']}, bad rows {len(stats['bad_rows'])} -> {args.output}")


def _build_tiny(args) -> None:
    from medcritical.modeling.tiny import build_tiny_model

    recipe = recipe_from_args(args)
    print(build_tiny_model(args.output, recipe.model.tiny))
