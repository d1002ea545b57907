"""Each step's needs checked against what its pod or task gives, and the table `medcritical plan` prints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medcritical.core.shipped import recipes_dir
from medcritical.orchestration.recipe import Recipe, RecipeError, dump_recipe, load_recipe, load_recipe_text
from medcritical.orchestration.runner import STAGES, keep_global_batch
from medcritical.platform.plan.manifests import Given
from medcritical.platform.plan.needs import Need, plan_steps
from medcritical.platform.plan.units import GiB, gib


@dataclass
class Problem:
    where: str
    step: str
    resource: str
    need: str
    have: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where} ({self.step}): {self.resource} needs {self.need}, has {self.have}; fix: {self.fix}"


def _global_batch_problems(need: Need, given: Given, recipe: Recipe) -> list[Problem]:
    """The runner divides the gradient accumulation by the world size (runner.keep_global_batch) or
    refuses the run: the same rule, checked before anything starts."""
    world = max(given.gpus, 1) * given.nodes
    try:
        keep_global_batch(STAGES[need.step], recipe, world)
    except RecipeError:
        key = "sft.trainer" if need.step == "sft" else "selfplay.dpo.trainer"
        accumulation = need.accumulation
        return [
            Problem(
                given.where,
                need.step,
                "global batch",
                f"{key}.gradient_accumulation_steps a multiple of the {world} ranks",
                str(accumulation),
                f"give the recipe's batch as on one GPU, e.g. --set {key}.gradient_accumulation_steps="
                f"{-(-accumulation // world) * world} (the runner divides it by the {world} ranks)",
            )
        ]
    return []


def check(need: Need, given: Given, gpu_memory: int, recipe: Recipe | None = None) -> list[Problem]:
    """The manifest's resources against the step's need (and, given the pod's recipe, its global batch)."""
    problems = []
    step, where = need.step, given.where
    in_pipeline = where.startswith("pipeline")
    recompile = "recompile the pipeline for this recipe (`medcritical compile --recipe ...`)"
    if need.gpus and not given.gpus:
        fix = (
            f"--param {given.gpu_param}={need.gpus}"
            if given.gpu_param
            else recompile
            if in_pipeline
            else "request nvidia.com/gpu (limits = requests)"
        )
        problems.append(Problem(where, step, "GPUs", f"{need.gpus}", "none", fix))
    if need.gpus and given.gpus and given.gpus < need.gpus and step not in ("sft", "dpo"):
        fix = (
            f"--param {given.gpu_param}={need.gpus}"
            if given.gpu_param
            else "as many GPUs as tensor_parallel_size (generation or distill.local)"
        )
        problems.append(Problem(where, step, "GPUs", str(need.gpus), str(given.gpus), fix))
    if need.gpu_memory > gpu_memory:
        problems.append(
            Problem(
                where,
                step,
                "GPU memory per rank",
                gib(need.gpu_memory),
                gib(gpu_memory),
                "more GPUs (ZeRO-3 shards weights, gradients and optimizer), LoRA, a shorter "
                "max_length or a smaller per_device_train_batch_size"
                if step in ("sft", "dpo", "run")
                else "a larger tensor_parallel_size (generation or distill.local) with as many GPUs, a shorter "
                "generation.max_model_len, or a higher gpu_memory_utilization",
            )
        )
    if recipe is not None and step in ("sft", "dpo"):
        problems += _global_batch_problems(need, given, recipe)
    if given.sized_by_plan:  # a TrainJob the pipeline sizes from this very plan: memory and disk fit
        return problems
    memory_need = need.host_memory + given.shm
    if given.memory is None or given.memory < memory_need:
        fix = (
            f"--param {given.memory_param}={gib(memory_need)} (submit and plan)"
            if given.memory_param
            else recompile
            if in_pipeline
            else f"resources.limits.memory and requests.memory >= {gib(memory_need)}"
        )
        problems.append(
            Problem(
                where,
                step,
                "memory",
                gib(memory_need) + " (host + /dev/shm)",
                gib(given.memory) if given.memory else "no limit",
                fix,
            )
        )
    if given.work is not None and given.work < need.disk:
        volume = given.work_volume or "the root filesystem"
        fix = (
            recompile + ": it sizes the work volumes from this plan"
            if in_pipeline
            else f"put MEDCRITICAL_WORKDIR on a volume of >= {gib(need.disk)} (emptyDir sizeLimit)"
        )
        problems.append(Problem(where, step, f"work folder volume {volume!r}", gib(need.disk), gib(given.work), fix))
    if given.ephemeral_needed and (given.ephemeral_request or 0) < need.disk:
        problems.append(
            Problem(
                where,
                step,
                "ephemeral-storage request",
                gib(need.disk),
                gib(given.ephemeral_request) if given.ephemeral_request else "none",
                f"requests.ephemeral-storage >= {gib(need.disk)}, or the kubelet evicts the pod",
            )
        )
    return problems


def recipe_for(recipe: Recipe, given: Given) -> Recipe:
    """The recipe a pod runs: the checked one (or the image's own, for the demo Job) with the pod's --set overrides."""
    if given.recipe:
        local = recipes_dir() / given.recipe
        recipe = load_recipe(local if local.is_file() else Path("recipes") / given.recipe)
    return load_recipe_text(dump_recipe(recipe), given.overrides) if given.overrides else recipe


@dataclass
class Verdict:
    given: Given
    need: Need
    problems: list[Problem]


def check_manifests(
    recipe: Recipe,
    givens: list[Given],
    *,
    gpu_memory: int,
    model_config: str | None = None,
    teacher_config: str | None = None,
) -> list[Verdict]:
    verdicts = []
    for given in givens:
        pod_recipe = recipe_for(recipe, given)
        needs = plan_steps(
            pod_recipe,
            train_gpus=max(given.gpus, 1),
            nodes=given.nodes,
            model_config=model_config,
            teacher_config=teacher_config,
        )
        need = needs[given.step]
        verdicts.append(Verdict(given, need, check(need, given, gpu_memory, pod_recipe)))
    return verdicts


def failing_steps(verdicts: list[Verdict]) -> dict[str, list[Problem]]:
    """Steps none of whose manifests fit (a step may have several: one GPU, several nodes)."""
    by_step: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        by_step.setdefault(verdict.need.step, []).append(verdict)
    return {
        step: [p for v in found for p in v.problems]
        for step, found in by_step.items()
        if all(v.problems for v in found)
    }


def table(needs: dict[str, Need], seconds: dict[str, float] | None = None) -> str:
    seconds = seconds or {}
    rows = [("step", "GPUs", "GPU mem/rank", "host mem", "disk (work folder)", "time", "notes")]
    for need in needs.values():
        rows.append(
            (
                need.step,
                str(need.gpus * need.nodes) if need.gpus else "-",
                gib(need.gpu_memory) if need.gpu_memory else "-",
                gib(need.host_memory),
                gib(need.disk),
                f"{seconds[need.step]:.0f} s" if need.step in seconds else "-",
                "; ".join(need.notes + [f"{k} {gib(v)}" for k, v in need.parts.items() if v >= GiB]),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(6)]
    return "\n".join("  ".join(cell.ljust(widths[c]) if c < 6 else cell for c, cell in enumerate(row)) for row in rows)
