"""`medcritical run`, `compile` and `submit`: the whole pipeline, on one machine or on a cluster."""

from __future__ import annotations

import argparse

from medcritical.cli.common import add_recipe_arguments

COMPILED = "pipelines/medcritical.yaml"


def add_parser(subparsers) -> None:
    run = subparsers.add_parser(
        "run",
        help="run the whole pipeline on this machine (KFP local runner)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Run the whole MedCritical pipeline on this machine through KFP's local subprocess runner (no
containers, no cluster): data -> evaluate base -> distill -> sft -> evaluate sft -> R x (rollout -> dpo)
-> evaluate dpo -> report. Outputs go to run.output_dir; the report compares the three models.

  medcritical run --recipe recipes/demo.yaml        # tiny model, bundled CMExam sample, CPU""",
    )
    add_recipe_arguments(run)
    run.add_argument(
        "--no-warm-worker",
        dest="warm",
        action="store_false",
        help="run every step's stage in its task's own fresh Python, as KFP's runner does by default, instead of in "
        "a fork of one process that has imported torch, transformers and TRL once (about 5-10 s saved per step "
        "that trains or generates; see medcritical.platform.warm_worker)",
    )
    run.set_defaults(func=_run)

    compile_ = subparsers.add_parser(
        "compile",
        help="compile the pipeline to KFP YAML for a cluster",
        description="Compile the pipeline for a Kubernetes cluster with Kubeflow Pipelines. The recipe becomes "
        "the default of the `recipe` parameter and fixes the number of self-play rounds; its run.train_gpus is "
        "the default of train_gpus. The plan's checks run on the result (exit 2, nothing written, when a task "
        "would not fit its recipe).",
    )
    add_recipe_arguments(compile_)
    compile_.add_argument(
        "--output", default=COMPILED, type=_yaml_file, help=f"where to write the YAML (default {COMPILED})"
    )
    _add_cluster_arguments(compile_)
    compile_.set_defaults(func=_compile)

    submit = subparsers.add_parser(
        "submit",
        help="compile and submit a pipeline run to a KFP server",
        description="Compile the pipeline for the recipe, check the run's parameters and run the plan's checks "
        "on it (exit 2 naming the task, the resource and the fix, nothing submitted, when it would not fit), "
        "then create a run on a Kubeflow Pipelines server (kfp.Client). Equivalent to `medcritical compile` + "
        "`medcritical plan` + `kfp run create`.",
    )
    add_recipe_arguments(submit)
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    submit.add_argument("--experiment", default="medcritical", help="KFP experiment name")
    submit.add_argument("--run-name", help="run name (default: recipe run.name)")
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter, e.g. --param train_gpus=8 --param s3_secret=medcritical-s3 (repeatable; YAML values)",
    )
    submit.add_argument(
        "--namespace", help="multi-user Kubeflow: your profile namespace (where the run and its pods live)"
    )
    submit.add_argument(
        "--token-file",
        metavar="PATH",
        help="a file holding a bearer token for the KFP API (multi-user Kubeflow); default: "
        "$KF_PIPELINES_SA_TOKEN_PATH or none",
    )
    _add_cluster_arguments(submit)
    submit.set_defaults(func=_submit)


def _yaml_file(value: str) -> str:
    """The compiled pipeline's path: KFP writes it only as YAML (the Kubernetes settings need it)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("blank; give a file path ending in .yaml, e.g. pipelines/medcritical.yaml")
    if not value.endswith((".yaml", ".yml")):
        raise argparse.ArgumentTypeError(
            f"{value!r}: the pipeline is written as YAML only; give a file path ending in .yaml, "
            "e.g. pipelines/medcritical.yaml"
        )
    return value


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", default="", help="image registry prefix, e.g. registry.example.com/ml/")
    parser.add_argument(
        "--image-digests",
        metavar="FILE",
        help="pin the images by digest: a JSON/YAML file mapping each image name (medcritical-cpu, "
        "medcritical-train-cuda, medcritical-infer-cuda) to the sha256:... digest the build pushed; every task "
        "and the TrainJobs then run name:tag@sha256:...",
    )
    parser.add_argument("--shm-size", default="16Gi", help="/dev/shm size of GPU steps (default 16Gi)")
    parser.add_argument(
        "--work-pvc",
        default="",
        metavar="PVC",
        help="PersistentVolumeClaim (ReadWriteMany) for the steps' work folders, so a retried pod resumes "
        "from the failed one's checkpoints and partial outputs (default: the pod's own disk)",
    )
    parser.add_argument(
        "--kueue-queue",
        default="",
        metavar="LOCALQUEUE",
        help="a Kueue LocalQueue: the GPU tasks' pods get its kueue.x-k8s.io/queue-name label (KFP's pod labels "
        "are fixed when compiling) and it is the default of the kueue_queue parameter, the TrainJobs' queue",
    )
    parser.add_argument(
        "--kueue-priority",
        default="",
        metavar="WORKLOADPRIORITYCLASS",
        help="a Kueue WorkloadPriorityClass, the same way (label kueue.x-k8s.io/priority-class; default of the "
        "kueue_priority parameter): KFP and Trainer v2.2 cannot set a pod's priorityClassName",
    )
    parser.add_argument(
        "--cache-teacher",
        action="store_true",
        help="allow KFP to reuse a cached distillation within a run, e.g. when a failed run is retried (off: a "
        "teacher endpoint is never silently skipped); across runs pass --param distill_uri=<earlier run>/distill",
    )
    parser.add_argument(
        "--model-config",
        metavar="PATH",
        help="the student's config.json (or its folder) when the model is in S3 and not of a shape the plan knows",
    )
    parser.add_argument("--teacher-config", metavar="PATH", help="the same for a local (vllm/transformers) teacher")
    parser.add_argument("--gpu-memory", default="80Gi", help="memory of one GPU for the plan's checks (default 80Gi)")


def _run(args) -> int:
    from medcritical.cli.common import recipe_from_args
    from medcritical.platform.local_run import run_locally

    recipe = recipe_from_args(args)
    report_dir = run_locally(recipe, warm=args.warm)
    print((report_dir / "report.md").read_text(encoding="utf-8"))
    print(f"report: {report_dir / 'report.md'}  plot: {report_dir / 'models.png'}")
    return 0


def _compile(args) -> None:
    from medcritical.cli.common import recipe_from_args
    from medcritical.platform.pipeline_runner import compile_pipeline

    path = compile_pipeline(
        recipe_from_args(args),
        args.output,
        registry=args.registry,
        image_digests=args.image_digests,
        shm_size=args.shm_size,
        cache_teacher=args.cache_teacher,
        work_pvc=args.work_pvc,
        kueue_queue=args.kueue_queue,
        kueue_priority=args.kueue_priority,
        model_config=args.model_config,
        teacher_config=args.teacher_config,
        gpu_memory=args.gpu_memory,
    )
    print(f"compiled {path}")


def _submit(args) -> None:
    from medcritical.cli.common import recipe_from_args
    from medcritical.platform.pipeline_runner import submit_run

    run = submit_run(
        recipe_from_args(args),
        args.host,
        experiment=args.experiment,
        run_name=args.run_name,
        params=args.param,
        registry=args.registry,
        image_digests=args.image_digests,
        shm_size=args.shm_size,
        cache_teacher=args.cache_teacher,
        work_pvc=args.work_pvc,
        kueue_queue=args.kueue_queue,
        kueue_priority=args.kueue_priority,
        namespace=args.namespace,
        token_file=args.token_file,
        model_config=args.model_config,
        teacher_config=args.teacher_config,
        gpu_memory=args.gpu_memory,
    )
    print(f"submitted run {run.run_id} to {args.host}")
