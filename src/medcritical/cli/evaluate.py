"""`medcritical evaluate`: score a model, or saved predictions, on CMExam under one protocol."""

from __future__ import annotations

import argparse

from medcritical.cli.common import add_recipe_arguments, add_restart_argument, questions_uri, recipe_from_args
from medcritical.errors import InputError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="CMExam accuracy of a model or of saved predictions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Measure CMExam accuracy under one protocol (evaluate.protocol), never mixed:
  mcq    options shown; answer letters read from the output by the project's grader
         (evaluate.scoring: generate, or loglik for single-answer questions)
  judge-paper   no options, raw prompt, sampled student; a judge (evaluate.judge.*) answers 1 or 2
                (SP-Huatuo's evaluation); judge errors dropped, counted beside the accuracy
  judge-rubric  no options; a judge with the reference and the expert explanation ends with a
                strict verdict line; judge errors dropped, counted beside the accuracy

Writes report.json, report.md, accuracy.png and graded.jsonl to --output.

Score saved outputs without any model (mcq protocol):
  medcritical evaluate --dataset eval.jsonl --predictions preds.jsonl --output DIR
  (predictions: JSONL rows {"id": ..., "output": "free text"})""",
    )
    add_recipe_arguments(parser)
    parser.add_argument(
        "--dataset",
        metavar="FILE",
        help="questions (.jsonl/.csv/.xlsx) or the prepare-data folder, a path or s3:// URI; default: the eval split of the recipe's data section",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH", help="model folder or 'tiny'; default: the recipe's model.base")
    source.add_argument("--predictions", metavar="FILE", help="saved outputs to score instead of running a model")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the report")
    parser.add_argument("--label", help="a name for the model in the report (e.g. 'sft')")
    add_restart_argument(parser)
    parser.set_defaults(func=_evaluate)

    compare = subparsers.add_parser(
        "compare",
        help="paired test of two evaluations on the same questions (exact McNemar, bootstrap CI)",
        description="Compare two evaluation folders (each with graded.jsonl), or two run folders (their "
        "eval-* folders of the same name): accuracy difference, its paired-bootstrap 95%% interval and the "
        "exact McNemar p-value, over the questions both answered.",
    )
    compare.add_argument("first", metavar="RUN_A", help="evaluation folder or run folder")
    compare.add_argument("second", metavar="RUN_B", help="evaluation folder or run folder")
    compare.add_argument("--json", action="store_true", help="print the comparisons as JSON")
    compare.set_defaults(func=_compare)


def _evaluate(args) -> None:
    from medcritical.core.values import percent
    from medcritical.evaluation.evaluate import score_predictions
    from medcritical.evaluation.report import dropped_note

    if args.predictions:
        if not args.dataset:
            raise InputError("--predictions needs --dataset (the questions the predictions answer)")
        report = score_predictions(args.dataset, args.predictions, args.output)
    else:
        from medcritical.evaluation.stage import EVALUATE
        from medcritical.orchestration.runner import run_stage

        recipe = recipe_from_args(args)
        with questions_uri(args.dataset, recipe) as dataset:
            report = run_stage(
                EVALUATE,
                recipe,
                args.output,
                data=dataset,
                model=args.model,
                label=args.label or "",
                restart=args.restart,
            )
    print(
        f"CMExam accuracy ({report['protocol']}): {percent(report['accuracy'])}% "
        f"({report['correct']}/{report['n']}{dropped_note(report)}, 95% CI {percent(report['ci95'][0])}–{percent(report['ci95'][1])}%)"
        f"\nreport: {args.output}/report.md"
    )


def _compare(args) -> None:
    import json

    from medcritical.evaluation.compare import compare, compare_markdown

    rows = compare(args.first, args.second)
    print(json.dumps(rows, indent=2) if args.json else compare_markdown(rows))
