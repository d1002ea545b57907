"""Step times measured by the benchmarks for this very recipe (benchmarks/results/, shipped with the package)."""

from __future__ import annotations

import json

from medcritical.core.shipped import benchmark_results_dir
from medcritical.evaluation.stage import EVALUATE
from medcritical.orchestration.recipe import Recipe, RecipeError, dump_recipe, load_recipe_text
from medcritical.orchestration.runner import STAGES
from medcritical.orchestration.staging import eval_folder, stage_folder
from medcritical.selfplay.stage import DPO, ROLLOUT


def measured_seconds(recipe: Recipe) -> tuple[dict[str, float], str] | None:
    """Per-step wall times measured for this very recipe (benchmarks/results/pipeline_e2e.json: the demo
    through the KFP local runner), and where; None when no benchmark ran this recipe."""
    results = benchmark_results_dir() / "pipeline_e2e.json"
    if not results.is_file():
        return None
    data = json.loads(results.read_text(encoding="utf-8"))
    raw = data.get("raw") or {}
    if data.get("status") != "ok" or not raw.get("recipe"):
        return None

    def comparable(r: Recipe) -> str:
        return dump_recipe(r.model_copy(update={"run": r.run.model_copy(update={"output_dir": None})}))

    try:
        measured = load_recipe_text(raw["recipe"])
    except RecipeError:  # measured with a recipe of an older schema: not this recipe
        return None
    if comparable(measured) != comparable(recipe):
        return None
    # A benchmark names each task by the folder it wrote (data, sft, round1-rollout, eval-base): a round's stage
    # counts by its first round, the evaluation by the base model's.
    steps = {stage_folder(stage, 1 if stage in (ROLLOUT, DPO) else None): stage.command for stage in STAGES.values()}
    steps[eval_folder("base")] = EVALUATE.command
    seconds = {}
    for task in raw.get("kfp_tasks") or []:
        name = steps.get(task["step"])
        if name and name not in seconds:
            seconds[name] = float(task["s"])
    if raw.get("kfp_total_s"):
        seconds["run"] = float(raw["kfp_total_s"])
    machine = data.get("machine") or {}
    where = f"{results.name}, {machine.get('cpu', '?')} x{machine.get('cpu_cores', '?')}, {data.get('started_at', '')}"
    return seconds, where


def training_time_note() -> str:
    """Time estimates need measured tokens/s on a GPU; say where they would come from when absent."""
    results = benchmark_results_dir() / "training_gpu.json"
    if results.is_file():
        status = json.loads(results.read_text(encoding="utf-8")).get("status")
        if status == "ok":
            return f"see {results.name} for tokens/s per GPU"
        return f"no estimate: {results.name} is {status!r} (python -m benchmarks.training_gpu on a GPU)"
    return "no estimate: no GPU benchmark figures in this checkout"
