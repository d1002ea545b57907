"""`medcritical distill`: teacher distillation of thought templates and long chains of thought."""

from __future__ import annotations

from medcritical.cli.common import (
    add_recipe_arguments,
    add_restart_argument,
    recipe_from_args,
    training_questions_uri,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="teacher writes verified reasoning traces: the SFT dataset",
        description=(
            "For each question the teacher (distill.backend: openai endpoint, local transformers/vllm "
            "model, or the data's own expert explanations) writes a thought template and a "
            "<think>...</think> reasoning trace; traces whose answer matches gold become sft.jsonl. "
            "Progress is appended to distill_raw.jsonl: rerun the same command to resume."
        ),
        epilog=(
            "Example: MEDCRITICAL_TEACHER_API_KEY=... medcritical distill --recipe recipes/demo.yaml "
            "--set distill.backend=openai --set distill.openai.base_url=http://qwq:8000/v1 "
            "--set distill.openai.model=Qwen/QwQ-32B --questions runs/data/train.jsonl --output runs/distill"
        ),
    )
    add_recipe_arguments(parser)
    parser.add_argument(
        "--questions",
        required=True,
        metavar="FILE",
        help="training questions (.jsonl/.csv/.xlsx) or the prepare-data folder; a path or s3:// URI. A file is "
        "checked for leakage against the recipe's evaluation questions first (data.on_leakage)",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder (or s3:// URI) for sft.jsonl and the statistics"
    )
    add_restart_argument(parser)
    parser.set_defaults(func=_distill)


def _distill(args) -> None:
    import json

    from medcritical.distill.stage import DISTILL
    from medcritical.orchestration.runner import run_stage

    recipe = recipe_from_args(args)
    with training_questions_uri(args.questions, recipe) as questions:
        stats = run_stage(DISTILL, recipe, args.output, data=questions, restart=args.restart)
    summary = {k: stats[k] for k in ("questions", "accepted", "acceptance_rate", "trace_attempts", "rejections")}
    print(json.dumps(summary, ensure_ascii=False))
