"""`medcritical plan`: what each step of a recipe needs, checked against the Jobs and the compiled pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

from medcritical.cli.common import add_recipe_arguments
from medcritical.errors import MissingInputError

DEFAULT_MANIFESTS = Path("k8s/jobs")
DEFAULT_PIPELINE = Path("pipelines/medcritical.yaml")


def add_parser(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="size every step (disk, memory, GPU memory) and check the Jobs and pipeline against it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Compute, from the recipe and the model's config.json (no weights loaded), what each step needs:
GPU memory per rank (weights, gradients, optimizer under its ZeRO stage or LoRA, activations,
the DPO reference, vLLM's KV cache), host memory and the work folder's disk. Then check the
Kubernetes Jobs and the compiled pipeline against it; exit 2 naming the step, the resource, the
need and the fix when one is too small. Formulas and sources: docs/sizing.md.

  medcritical plan --recipe recipes/paper-7b-lora.yaml
  medcritical plan --recipe recipes/full-zero3-8gpu.yaml --train-gpus 8
  medcritical plan --recipe my.yaml --manifests my-overlay.yaml --no-pipeline   # kubectl kustomize output""",
    )
    add_recipe_arguments(plan)
    plan.add_argument(
        "--model-config",
        metavar="PATH",
        help="the student's config.json (or its folder) when the model is in S3 and not of a known shape",
    )
    plan.add_argument("--teacher-config", metavar="PATH", help="the same for a local (vllm/transformers) teacher")
    plan.add_argument(
        "--train-gpus",
        type=int,
        default=None,
        help="GPUs per training pod for the table and the pipeline's train_gpus (default: the pipeline's default, 1)",
    )
    plan.add_argument("--gpu-memory", default="80Gi", help="memory of one GPU (default 80Gi: A100/H100 80 GB)")
    plan.add_argument(
        "--manifests",
        type=Path,
        action="append",
        default=None,
        metavar="PATH",
        help=f"YAML files or folders of Jobs/PyTorchJobs/TrainJobs (default {DEFAULT_MANIFESTS}/, repeatable)",
    )
    plan.add_argument(
        "--pipeline",
        type=Path,
        default=DEFAULT_PIPELINE,
        help=f"the compiled pipeline to check (default {DEFAULT_PIPELINE})",
    )
    plan.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter as you would submit it, e.g. --param train_memory=160Gi",
    )
    plan.add_argument("--no-manifests", action="store_true", help="do not check Kubernetes manifests")
    plan.add_argument("--no-pipeline", action="store_true", help="do not check the compiled pipeline")
    plan.set_defaults(func=_plan)


def _plan(args) -> int:
    from medcritical import plan as sizing
    from medcritical.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    gpu_memory = sizing.quantity(args.gpu_memory)
    needs = sizing.plan_steps(
        recipe, train_gpus=args.train_gpus or 1, model_config=args.model_config, teacher_config=args.teacher_config
    )
    print(f"recipe {args.recipe or '(defaults)'}: {recipe.model.base}, GPUs of {args.gpu_memory}")
    measured = sizing.measured_seconds(recipe)
    print(sizing.table(needs, measured[0] if measured else None))
    print(f"time: measured for this recipe ({measured[1]})" if measured else f"time: {sizing.training_time_note()}")

    givens = []
    if not args.no_manifests:
        paths = args.manifests or [DEFAULT_MANIFESTS]
        for path in paths:
            if not path.exists():
                raise MissingInputError(
                    f"--manifests {path}: no such file or folder (run from the checkout's root, "
                    "or pass --manifests PATH or --no-manifests)"
                )
        givens += sizing.given_from_manifests(paths)
    if not args.no_pipeline:
        if args.pipeline == DEFAULT_PIPELINE and not args.pipeline.is_file():
            from importlib.resources import files

            args.pipeline = Path(str(files("medcritical.pipelines") / "medcritical.yaml"))  # the installed copy
        if not args.pipeline.is_file():
            raise MissingInputError(f"--pipeline {args.pipeline}: no such file; `medcritical compile` writes it")
        from medcritical.pipeline_runner import parse_params

        params = {**({"train_gpus": args.train_gpus} if args.train_gpus else {}), **parse_params(args.param)}
        givens += sizing.given_from_pipeline(args.pipeline, params)

    verdicts = sizing.check_manifests(
        recipe, givens, gpu_memory=gpu_memory, model_config=args.model_config, teacher_config=args.teacher_config
    )
    for verdict in verdicts:
        status = "ok" if not verdict.problems else "too small"
        print(f"{status:9}  {verdict.given.where}: {verdict.need.step}")
        for problem in verdict.problems:
            print(f"           {problem.resource}: needs {problem.need}, has {problem.have}")
    # A step may have several manifests (one GPU, several nodes): it fails when none of them fits.
    manifest_failures = sizing.failing_steps([v for v in verdicts if not v.given.where.startswith("pipeline")])
    pipeline_failures = [p for v in verdicts if v.given.where.startswith("pipeline") for p in v.problems]
    failures = [p for problems in manifest_failures.values() for p in problems] + pipeline_failures
    if failures:
        print("\nplan: error: these do not fit the recipe:")
        for problem in failures:
            print(f"  {problem}")
        return 2
    small = sum(bool(v.problems) for v in verdicts)
    also = f"; {small} other manifest(s) too small for this recipe, listed above" if small else ""
    print(f"\nplan: every checked step fits ({len(verdicts)} pods and tasks{also})")
    return 0
