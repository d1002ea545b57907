"""KFP component `sft`: a thin shell over `medcritical.steps.sft` (the library does the work)."""

from kfp import dsl

IMAGE = "train"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def sft(recipe: str, run_root: str, name: str, distill_uri: str, model_uri: str, metrics: dsl.Output[dsl.Metrics]) -> str:
    """Supervised fine-tuning of the student on the verified traces (LoRA or full; DeepSpeed ZeRO from the recipe).

    Returns the URI of its output folder, `<run_root>/<name>`.
    """
    from medcritical.steps import run_component_step

    return run_component_step("sft", recipe, run_root, name, metrics, distill_uri=distill_uri, model_uri=model_uri)
