"""KFP component `evaluate`: a thin shell over the runner (stage `evaluate`; the library does the work)."""

from kfp import dsl

IMAGE = "infer"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def evaluate(
    recipe: str,
    run_root: str,
    name: str,
    data: dsl.Input[dsl.Dataset],
    label: str,
    metrics: dsl.Output[dsl.Metrics],
    model: dsl.Input[dsl.Model] = None,
    run_id: str = "",
):
    """CMExam accuracy of one model under the recipe's protocol (mcq, judge-paper or judge-rubric), labelled.

    Without `model` it evaluates the recipe's `model.base`. `metrics` holds the accuracy and stands for its
    output folder, `<run_root>/<run_id>/<name>`, which the report reads.
    """
    from medcritical.platform.kfp_runtime import location_of, record_location, run_component_step, task_root

    output_uri = run_component_step(
        "evaluate",
        recipe,
        task_root(run_root, run_id),
        name,
        metrics,
        data=location_of(data),
        model=location_of(model),
        label=label,
    )
    record_location(metrics, output_uri)
