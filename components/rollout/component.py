"""KFP component `rollout`: a thin shell over `medcritical.steps.rollout` (the library does the work)."""

from kfp import dsl

IMAGE = "infer"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def rollout(
    recipe: str, run_root: str, name: str, data_uri: str, model_uri: str, metrics: dsl.Output[dsl.Metrics]
) -> str:
    """Self-play: k answers per training question, self-correction of the wrong ones, preference pairs.

    Returns the URI of its output folder, `<run_root>/<name>`.
    """
    from medcritical.kfp_runtime import run_component_step

    return run_component_step("rollout", recipe, run_root, name, metrics, data_uri=data_uri, model_uri=model_uri)
