"""`medcritical plan`: what each step of a recipe needs, checked against the Jobs and the compiled pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

from medcritical.cli.common import add_recipe_arguments

DEFAULT_MANIFESTS = Path("k8s/jobs")


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

The pipeline checked is the one `medcritical submit --recipe R` would send (compiled for this
recipe: its training tasks on the recipe's run.train_gpus GPUs), with the --param values you
would submit; --pipeline FILE checks a compiled file instead (e.g. for `kfp run create`).

  medcritical plan --recipe recipes/paper-7b-lora.yaml
  medcritical plan --recipe recipes/full-zero3-8gpu.yaml              # run.train_gpus: 8
  medcritical plan --recipe recipes/paper-7b-lora.yaml --pipeline pipelines/medcritical.yaml --param train_gpus=8 --param train_memory=136Gi
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
        help="GPUs per training pod for the table and the pipeline's train_gpus (default: the recipe's run.train_gpus)",
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
        default=None,
        help="a compiled pipeline to check (default: the pipeline compiled for this recipe, as submit sends it)",
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
    from medcritical.orchestration.recipe import load_recipe
    from medcritical.platform import plan as sizing

    recipe = load_recipe(args.recipe, args.overrides)
    gpu_memory = sizing.quantity(args.gpu_memory)
    if args.train_gpus is not None and args.train_gpus < 0:
        raise sizing.PlanError(f"--train-gpus {args.train_gpus}: a whole number of GPUs, 0 or more")
    needs = sizing.plan_steps(
        recipe, train_gpus=args.train_gpus or None, model_config=args.model_config, teacher_config=args.teacher_config
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
                raise sizing.PlanError(
                    f"--manifests {path}: no such file or folder (run from the checkout's root, "
                    "or pass --manifests PATH or --no-manifests)"
                )
        givens += sizing.given_from_manifests(paths)
    if not args.no_pipeline:
        givens += _pipeline_givens(args, recipe)

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


def _pipeline_givens(args, recipe) -> list:
    """The pipeline's tasks as the run would get them: the given compiled file, or the pipeline compiled for
    this recipe; the --param values checked as submit checks them."""
    import tempfile

    import yaml

    from medcritical.platform import plan as sizing
    from medcritical.platform.pipeline_runner import check_params, compile_pipeline, parse_params

    params = parse_params(args.param)
    if args.train_gpus is not None:
        params.setdefault("train_gpus", args.train_gpus)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.pipeline
        if path is None:
            path = compile_pipeline(
                recipe,
                Path(tmp) / "medcritical.yaml",
                model_config=args.model_config,
                teacher_config=args.teacher_config,
                check=False,
            )
        elif not path.is_file():
            raise sizing.PlanError(f"--pipeline {path}: no such file; `medcritical compile` writes it")
        try:
            doc = next(yaml.safe_load_all(path.read_text(encoding="utf-8")))
            sizing.pipeline_parameters(doc)
        except (yaml.YAMLError, UnicodeDecodeError, StopIteration, KeyError, TypeError) as e:
            raise sizing.PlanError(f"--pipeline {path}: not a compiled KFP pipeline ({e})") from None
        return sizing.given_from_pipeline(path, check_params(doc, params))
