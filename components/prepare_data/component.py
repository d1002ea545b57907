"""KFP component `prepare_data`: a thin shell over `medcritical.steps.prepare_data` (the library does the work)."""

from kfp import dsl

IMAGE = "cpu"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def prepare_data(recipe: str, run_root: str, name: str, metrics: dsl.Output[dsl.Metrics]) -> str:
    """Load CMExam, split train/eval deterministically, drop leaked training questions.

    Returns the URI of its output folder, `<run_root>/<name>`.
    """
    from medcritical.kfp_runtime import run_component_step

    return run_component_step("prepare_data", recipe, run_root, name, metrics)
