"""KFP component `distill`: a thin shell over the runner (stage `distill`; the library does the work)."""

from kfp import dsl

IMAGE = "infer"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def distill(
    recipe: str,
    run_root: str,
    name: str,
    data: dsl.Input[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    traces: dsl.Output[dsl.Dataset],
    reuse_uri: str = "",
    run_id: str = "",
):
    """Teacher distillation: thought templates and long chains of thought, verified by the grader.

    `traces` stands for its output folder, `<run_root>/<run_id>/<name>`; with `reuse_uri` (the distill folder of an
    earlier run, the pipeline's `distill_uri` parameter) the teacher is not called and `traces` stands for
    that folder.
    """
    from medcritical.platform.kfp_runtime import (
        location_of,
        record_location,
        reuse_step_output,
        run_component_step,
        task_root,
    )

    if reuse_uri:
        record_location(traces, reuse_step_output("distill", reuse_uri))
        return
    record_location(
        traces,
        run_component_step("distill", recipe, task_root(run_root, run_id), name, metrics, data=location_of(data)),
    )
