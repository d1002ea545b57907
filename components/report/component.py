"""KFP component `report`: the run's summary, shown in the KFP UI as Markdown."""

from kfp import dsl

IMAGE = "cpu"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def report(
    recipe: str,
    run_root: str,
    name: str,
    base_eval: dsl.Input[dsl.Metrics],
    sft_eval: dsl.Input[dsl.Metrics],
    dpo_eval: dsl.Input[dsl.Metrics],
    traces: dsl.Input[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    summary: dsl.Output[dsl.Markdown],
    last_round: dsl.Input[dsl.Model] = None,
    run_id: str = "",
):
    """The base, SFT and DPO models' CMExam accuracy side by side, per-step statistics and a plot.

    `traces` is the distill step's output (an earlier run's folder when the pipeline reused its traces);
    `last_round` the last self-play round's DPO output, whose rounds file holds every round's statistics (none
    when the pipeline has no round).

    `summary` is the report as Markdown and stands for its output folder, `<run_root>/<run_id>/<name>`.
    """
    from medcritical.platform.kfp_runtime import location_of, record_location, run_component_step, task_root

    output_uri = run_component_step(
        "report",
        recipe,
        task_root(run_root, run_id),
        name,
        metrics,
        markdown=summary,
        base_eval=location_of(base_eval),
        sft_eval=location_of(sft_eval),
        dpo_eval=location_of(dpo_eval),
        distill=location_of(traces),
        rounds=location_of(last_round),
    )
    record_location(summary, output_uri)
