"""KFP component `prepare_data`: a thin shell over the runner (stage `prepare_data`; the library does the work)."""

from kfp import dsl

IMAGE = "cpu"  # which image runs it: cpu, train (CUDA + DeepSpeed) or infer (CUDA + vLLM)


def prepare_data(
    recipe: str,
    run_root: str,
    name: str,
    metrics: dsl.Output[dsl.Metrics],
    data: dsl.Output[dsl.Dataset],
    run_id: str = "",
):
    """Load CMExam, split train/eval deterministically, drop leaked training questions.

    `data` stands for its output folder, `<run_root>/<run_id>/<name>` (its metadata `location`).
    """
    from medcritical.platform.kfp_runtime import record_location, run_component_step, task_root

    record_location(data, run_component_step("prepare_data", recipe, task_root(run_root, run_id), name, metrics))
