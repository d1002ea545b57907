"""KFP component `evaluate`: a thin shell over `medcritical.steps.evaluate` (the library does the work)."""

from kfp import dsl

IMAGE = "infer"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def evaluate(
    recipe: str, run_root: str, name: str, data_uri: str, model_uri: str, label: str, metrics: dsl.Output[dsl.Metrics]
) -> str:
    """CMExam accuracy of one model under the recipe's protocol (mcq, judge-paper or judge-rubric), labelled.

    Returns the URI of its output folder, `<run_root>/<name>`.
    """
    from medcritical.kfp_runtime import run_component_step

    return run_component_step(
        "evaluate", recipe, run_root, name, metrics, data_uri=data_uri, model_uri=model_uri, label=label
    )
