"""KFP component `sft`: a thin shell over `medcritical.runner.run_stage` (stage `sft`) (the library does the work)."""

from kfp import dsl

IMAGE = "train"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def sft(
    recipe: str,
    run_root: str,
    name: str,
    distill_uri: str,
    model_uri: str,
    metrics: dsl.Output[dsl.Metrics],
    train_nodes: int = 1,
    node_gpus: int = 8,
    trainjob_image: str = "",
    s3_secret: str = "medcritical-s3",
) -> str:
    """Supervised fine-tuning of the student on the verified traces (LoRA or full; DeepSpeed ZeRO from the recipe).

    Returns the URI of its output folder, `<run_root>/<name>`. With `train_nodes` > 1 the step runs as a
    Kubeflow Trainer TrainJob on that many nodes of `node_gpus` GPUs, which this task creates and awaits.
    """
    from medcritical.trainjob import run_training_step

    return run_training_step(
        "sft",
        recipe,
        run_root,
        name,
        metrics,
        nodes=train_nodes,
        gpus_per_node=node_gpus,
        image=trainjob_image,
        s3_secret=s3_secret,
        distill_uri=distill_uri,
        model_uri=model_uri,
    )
