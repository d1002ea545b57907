"""KFP component `rollout`: a thin shell over the runner (stage `rollout`; the library does the work)."""

from kfp import dsl

IMAGE = "infer"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def rollout(
    recipe: str,
    run_root: str,
    name: str,
    data: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    pairs: dsl.Output[dsl.Dataset],
    run_id: str = "",
):
    """Self-play: k answers per training question, self-correction of the wrong ones, preference pairs.

    `pairs` stands for its output folder, `<run_root>/<run_id>/<name>`.
    """
    from medcritical.platform.kfp_runtime import location_of, record_location, run_component_step, task_root

    output_uri = run_component_step(
        "rollout", recipe, task_root(run_root, run_id), name, metrics, data=location_of(data), model=location_of(model)
    )
    record_location(pairs, output_uri)
