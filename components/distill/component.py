"""KFP component `distill`: a thin shell over `medcritical.steps.distill` (the library does the work)."""

from kfp import dsl

IMAGE = "infer"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def distill(recipe: str, run_root: str, name: str, data_uri: str, metrics: dsl.Output[dsl.Metrics]) -> str:
    """Teacher distillation: thought templates and long chains of thought, verified by the grader.

    Returns the URI of its output folder, `<run_root>/<name>`.
    """
    from medcritical.steps import run_component_step

    return run_component_step("distill", recipe, run_root, name, metrics, data_uri=data_uri)
