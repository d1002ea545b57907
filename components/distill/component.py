"""KFP component `distill`: a thin shell over `medcritical.steps.distill` (the library does the work)."""

from kfp import dsl

IMAGE = "infer"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def distill(
    recipe: str, run_root: str, name: str, data_uri: str, metrics: dsl.Output[dsl.Metrics], reuse_uri: str = ""
) -> str:
    """Teacher distillation: thought templates and long chains of thought, verified by the grader.

    Returns the URI of its output folder, `<run_root>/<name>`; with `reuse_uri` (the distill folder of an
    earlier run, the pipeline's `distill_uri` parameter) the teacher is not called and that URI is returned.
    """
    from medcritical.kfp_runtime import reuse_step_output, run_component_step

    if reuse_uri:
        return reuse_step_output("distill", reuse_uri)
    return run_component_step("distill", recipe, run_root, name, metrics, data_uri=data_uri)
