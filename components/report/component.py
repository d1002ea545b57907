"""KFP component `report`: the run's summary, shown in the KFP UI as Markdown."""

from kfp import dsl

IMAGE = "cpu"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def report(
    recipe: str,
    run_root: str,
    name: str,
    base_eval_uri: str,
    sft_eval_uri: str,
    dpo_eval_uri: str,
    metrics: dsl.Output[dsl.Metrics],
    summary: dsl.Output[dsl.Markdown],
) -> str:
    """The base, SFT and DPO models' CMExam accuracy side by side, per-step statistics and a plot.

    Returns the URI of its output folder, `<run_root>/<name>`.
    """
    from medcritical.kfp_runtime import run_component_step

    return run_component_step(
        "report",
        recipe,
        run_root,
        name,
        metrics,
        markdown=summary,
        base_eval_uri=base_eval_uri,
        sft_eval_uri=sft_eval_uri,
        dpo_eval_uri=dpo_eval_uri,
    )
