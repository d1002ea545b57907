"""KFP component `dpo`: a thin shell over `medcritical.steps.dpo` (the library does the work)."""

from kfp import dsl

IMAGE = "train"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def dpo(recipe: str, run_root: str, name: str, rollout_uri: str, model_uri: str, metrics: dsl.Output[dsl.Metrics]) -> str:
    """DPO on the self-play pairs, starting from (and referenced to) the current model.

    Returns the URI of its output folder, `<run_root>/<name>`.
    """
    from medcritical.steps import run_component_step

    return run_component_step("dpo", recipe, run_root, name, metrics, rollout_uri=rollout_uri, model_uri=model_uri)
