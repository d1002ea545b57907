"""`medcritical evaluate`: score a model, or saved predictions, on CMExam under one protocol."""

from __future__ import annotations

import argparse

from medcritical.cli.common import add_recipe_arguments, recipe_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="CMExam accuracy of a model or of saved predictions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Measure CMExam accuracy under one protocol (evaluate.protocol), never mixed:
  mcq    options shown; answer letters read from the output by the project's grader
         (evaluate.scoring: generate, or loglik for single-answer questions)
  judge  no options; a judge model (evaluate.judge.*) grades the free answer

Writes report.json, report.md, accuracy.png and graded.jsonl to --output.

Score saved outputs without any model (mcq protocol):
  medcritical evaluate --dataset eval.jsonl --predictions preds.jsonl --output DIR
  (predictions: JSONL rows {"id": ..., "output": "free text"})""",
    )
    add_recipe_arguments(parser)
    parser.add_argument(
        "--dataset", metavar="FILE",
        help="questions (.jsonl/.csv/.xlsx); default: the eval split of the recipe's data section",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH", help="model folder or 'tiny'; default: the recipe's model.base")
    source.add_argument("--predictions", metavar="FILE", help="saved outputs to score instead of running a model")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the report")
    parser.add_argument("--label", help="a name for the model in the report (e.g. 'sft')")
    parser.set_defaults(func=_evaluate)


def _evaluate(args) -> None:
    from medcritical.evaluation.evaluate import evaluate_model, score_predictions

    if args.predictions:
        if not args.dataset:
            raise ValueError("--predictions needs --dataset (the questions the predictions answer)")
        report = score_predictions(args.dataset, args.predictions, args.output)
    else:
        from medcritical.data.cmexam import load_questions
        from medcritical.modeling import resolve_model

        recipe = recipe_from_args(args)
        if args.dataset:
            questions = load_questions(args.dataset, recipe.data.on_bad_row).questions
        else:
            questions = _recipe_eval_split(recipe)
        model = resolve_model(args.model or recipe.model.base, recipe.model.tiny)
        report = evaluate_model(
            recipe.evaluate, recipe.generation, questions, model, args.output,
            device=recipe.run.device, dtype=recipe.model.dtype, label=args.label,
        )
    print(
        f"CMExam accuracy ({report['protocol']}): {100 * report['accuracy']:.1f}% "
        f"({report['correct']}/{report['n']}, 95% CI {100 * report['ci95'][0]:.1f}–{100 * report['ci95'][1]:.1f}%)"
        f"\nreport: {args.output}/report.md"
    )


def _recipe_eval_split(recipe):
    import tempfile

    from medcritical.data.cmexam import load_questions
    from medcritical.data.prepare import EVAL_FILE, prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(recipe.data, recipe.run.seed, tmp)
        return load_questions(f"{tmp}/{EVAL_FILE}").questions
