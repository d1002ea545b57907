"""KFP component `dpo`: a thin shell over the runner (stage `dpo`; the library does the work)."""

from kfp import dsl

IMAGE = "train"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def dpo(
    recipe: str,
    run_root: str,
    name: str,
    pairs: dsl.Input[dsl.Dataset],
    start_model: dsl.Input[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    model: dsl.Output[dsl.Model],
    previous_round: dsl.Input[dsl.Model] = None,
    train_nodes: int = 1,
    node_gpus: int = 8,
    trainjob_image: str = "",
    s3_secret: str = "medcritical-s3",
    run_id: str = "",
    gpu_product: str = "",
    kueue_queue: str = "",
    kueue_priority: str = "",
):
    """DPO on the self-play pairs, starting from (and referenced to) the current model.

    `previous_round` is the previous round's DPO output (none in round 1), whose rounds file (every round's
    statistics so far) this round's extends.

    `model` stands for its output folder, `<run_root>/<run_id>/<name>`. With `train_nodes` > 1 the step runs as a
    Kubeflow Trainer TrainJob on that many nodes of `node_gpus` GPUs, which this task creates and awaits
    (on `gpu_product` nodes, admitted by the Kueue LocalQueue `kueue_queue` at `kueue_priority`, when set).
    """
    from medcritical.platform.kfp_runtime import location_of, record_location, task_root
    from medcritical.platform.trainjob import run_training_step

    output_uri = run_training_step(
        "dpo",
        recipe,
        task_root(run_root, run_id),
        name,
        metrics,
        nodes=train_nodes,
        gpus_per_node=node_gpus,
        image=trainjob_image,
        s3_secret=s3_secret,
        gpu_product=gpu_product,
        kueue_queue=kueue_queue,
        kueue_priority=kueue_priority,
        rollout=location_of(pairs),
        model=location_of(start_model),
        previous_rounds=location_of(previous_round),
    )
    record_location(model, output_uri)
