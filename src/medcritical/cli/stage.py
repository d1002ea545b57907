"""`medcritical stage NAME`: any stage by its declaration, inputs given by their declared names.

What the pipeline's torchrun relaunch and the multi-node TrainJob run on every rank; for people the
per-stage commands (`medcritical sft`, `medcritical dpo`, ...) say the same with named flags.
"""

from __future__ import annotations

from medcritical.cli.common import (
    add_recipe_arguments,
    add_restart_argument,
    recipe_from_args,
    training_questions_uri,
)
from medcritical.errors import InputError

# Stages that train on (or distil) the questions of their `data` input: a file given straight there is
# checked for leakage as `medcritical distill` / `rollout --questions FILE` check it (issue 24 item 9).
TRAINS_ON_DATA = ("distill", "rollout")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "stage",
        help="run one stage by its declaration (what torchrun relaunches and TrainJobs run)",
        description="Run one stage of the pipeline through the runner: its inputs by their declared names "
        "(see docs/architecture.md), e.g. `medcritical stage sft --input distill=s3://bkt/run/distill "
        "--output s3://bkt/run/sft`. Inputs not given take their declared defaults under run.output_dir.",
    )
    # Not argparse choices: the names come from the declarations (runner.STAGES), loaded only when a stage runs.
    parser.add_argument("name", help="the stage's declared name, e.g. prepare_data, sft (a wrong one lists them all)")
    add_recipe_arguments(parser)
    parser.add_argument(
        "--input",
        dest="inputs",
        metavar="NAME=URI",
        action="append",
        default=[],
        help="an input by its declared name (repeatable), e.g. --input model=s3://bkt/run/sft",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="the stage's output folder or s3:// URI")
    add_restart_argument(parser)
    parser.set_defaults(func=_stage)


def _stage(args) -> None:
    import json

    from medcritical.core.values import assignment
    from medcritical.io.ranks import is_main_process
    from medcritical.orchestration.runner import STAGES, run_stage

    stage = STAGES.get(args.name)
    if stage is None:
        raise InputError(f"stage {args.name!r}: no such stage; the stages are {', '.join(STAGES)}")
    inputs = {}
    for item in args.inputs:
        form = f"NAME=URI with NAME one of {', '.join(stage.inputs) or '(no inputs)'}"
        name, uri = assignment(item, option="--input", form=form, example=f"{next(iter(stage.inputs), 'data')}=runs/x")
        if name not in stage.inputs:
            raise InputError(
                f"--input {item!r}: give NAME=URI with NAME one of the {stage.name} stage's inputs: "
                f"{', '.join(stage.inputs) or '(none)'}"
            )
        inputs[name] = uri
    options = {"restart": args.restart} if "restart" in stage.options else {}
    recipe = recipe_from_args(args)
    if stage.name in TRAINS_ON_DATA and inputs.get("data"):
        with training_questions_uri(inputs["data"], recipe) as data:
            result = run_stage(stage, recipe, args.output, **{**inputs, "data": data}, **options)
    else:
        result = run_stage(stage, recipe, args.output, **inputs, **options)
    if is_main_process():
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, ensure_ascii=False))
