"""`medcritical sft`: stage 1 supervised fine-tuning. Runs as one process or under torchrun / accelerate launch."""

from __future__ import annotations

import json

from medcritical.cli.common import add_recipe_arguments, add_restart_argument, recipe_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on distilled traces (TRL, LoRA or full, DeepSpeed ZeRO)",
        description=(
            "Fine-tune the student on the teacher's traces (JSONL rows with \"messages\"), loss on the assistant's "
            "tokens only; settings from the recipe's sft section. A rerun with the same --output resumes from the "
            "last checkpoint. Multi-GPU / multi-node: torchrun --nproc_per_node N -m medcritical.cli sft ... with "
            "sft.deepspeed set to zero2 or zero3 (see docs/training.md)."
        ),
        epilog="Example: medcritical sft --recipe recipes/demo.yaml --dataset runs/demo/distill/sft.jsonl "
        "--model tiny --output runs/demo/sft",
    )
    add_recipe_arguments(parser)
    parser.add_argument(
        "--dataset",
        required=True,
        metavar="FILE",
        help="sft.jsonl of the distill step, or its folder; a path or s3:// URI",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="base model: a Hugging Face folder (path or s3:// URI) or 'tiny' (default: model.base)",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder (or s3:// URI) for checkpoints/, model/, metrics"
    )
    add_restart_argument(parser)
    parser.set_defaults(func=_sft)


def _sft(args) -> None:
    from medcritical.io.ranks import is_main_process
    from medcritical.orchestration.runner import run_stage
    from medcritical.training.stage import SFT

    metrics = run_stage(
        SFT, recipe_from_args(args), args.output, distill=args.dataset, model=args.model, restart=args.restart
    )
    if is_main_process():
        summary = {k: v for k, v in metrics.items() if k != "loss_curve"}
        print(json.dumps(summary, indent=2, ensure_ascii=False))
