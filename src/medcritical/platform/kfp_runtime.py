"""The KFP side of a step: what runs inside a pipeline task around the library's step function.

The pipeline's `configure` step (the recipe resolved once), the relaunch of a training step under
torchrun on every GPU of its pod, the reuse of an earlier run's output, the step's numbers logged
to the KFP UI, and the artifacts that carry each step's folder to the next (the run's lineage). The
components (components/<step>/component.py) call `run_component_step` (sft and dpo through
`trainjob.run_training_step`), `location_of` and `record_location`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from medcritical.errors import InputError
from medcritical.orchestration.recipe import Recipe, RecipeError, dump_recipe, load_recipe_text
from medcritical.orchestration.staging import input_file, join_uri, local_output_path
from medcritical.platform import warm_worker

if TYPE_CHECKING:
    from medcritical.core.stage import Stage  # annotations only

# medcritical.orchestration.runner (every stage's module) is imported in the functions that run a stage: the configure task
# imports this module for resolve_recipe_text alone, and a fresh process pays ~0.5 s for the runner's imports.

log = logging.getLogger(__name__)


def resolve_recipe_text(
    recipe_yaml: str,
    rounds: int,
    overrides: list,
    base_model: str,
    teacher_base_url: str,
    teacher_model: str,
    teacher_on_gpu: bool = True,
) -> str:
    """The pipeline's `configure` step: named knobs and overrides applied, validated, as YAML."""
    named = {
        "model.base": base_model,
        "distill.openai.base_url": teacher_base_url,
        "distill.openai.model": teacher_model,
    }
    assignments = [f"{key}={value}" for key, value in named.items() if value] + list(overrides)
    resolved = resolved_before(recipe_yaml, assignments)
    if resolved is not None:  # checked in full by the `medcritical run` that started this task
        recipe = load_recipe_text(resolved, checked=True)
    else:
        recipe = load_recipe_text(recipe_yaml, assignments)
    if recipe.selfplay.rounds != rounds:
        raise RecipeError(
            f"selfplay.rounds is {recipe.selfplay.rounds} but this pipeline was compiled for {rounds} rounds; "
            f"recompile with `medcritical compile --set selfplay.rounds={recipe.selfplay.rounds}` (the rounds are "
            "tasks of the compiled graph) or change the recipe"
        )
    if not teacher_on_gpu and recipe.distill.backend in ("vllm", "transformers"):
        raise RecipeError(
            f"distill.backend is {recipe.distill.backend} (a teacher in the pod) but this pipeline was compiled for "
            "an API teacher: its distill task has no GPU and the CPU image; recompile with this recipe "
            "(`medcritical compile --recipe ...`)"
        )
    return dump_recipe(recipe)


# The recipe checked once: `medcritical run` (local_run) checks the recipe it hands its pipeline in full before
# the pipeline starts (TRL's trainer configs built, which imports torch, transformers and TRL: seconds in a fresh
# process) and passes the result to its tasks, subprocesses of it in the same Python, in this variable: JSON
# {"key": resolved_key(recipe text, assignments), "recipe": the recipe validated in full, as YAML}. The configure
# task given that text and those assignments starts from that result instead of building the TRL configs again.
# Unset on a cluster, and for anything else: configure checks in full.
RESOLVED_RECIPE_ENV = "MEDCRITICAL_RESOLVED_RECIPE"


def resolved_key(recipe_yaml: str, assignments: list[str]) -> str:
    return hashlib.sha256(json.dumps([recipe_yaml, list(assignments)]).encode("utf-8")).hexdigest()


def resolved_recipe_env(recipe_yaml: str, assignments: list[str] = ()) -> dict[str, str]:
    """RESOLVED_RECIPE_ENV for the tasks of a pipeline whose configure gets `recipe_yaml` and `assignments`:
    the recipe validated in full here, once (RecipeError when it is not valid)."""
    recipe = load_recipe_text(recipe_yaml, list(assignments))
    value = {"key": resolved_key(recipe_yaml, list(assignments)), "recipe": dump_recipe(recipe)}
    return {RESOLVED_RECIPE_ENV: json.dumps(value)}


def resolved_before(recipe_yaml: str, assignments: list[str]) -> str | None:
    """The recipe validated in full (YAML) by the process that started this one, when it validated exactly
    `recipe_yaml` with `assignments` (RESOLVED_RECIPE_ENV); else None."""
    given = os.environ.get(RESOLVED_RECIPE_ENV)
    if not given:
        return None
    try:
        value = json.loads(given)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("key") != resolved_key(recipe_yaml, assignments):
        return None
    return value.get("recipe")


def uses_every_gpu(stage: Stage) -> bool:
    """Training stages (those that make a model) run one process per GPU of their pod."""
    return stage.produces == "model"


def visible_gpus() -> int:
    import torch  # lazy: the configure step and `medcritical submit` need no torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def data_parallel_command(stage: Stage, recipe_path: str, output_uri: str, inputs: dict, gpus: int) -> list[str]:
    """torchrun over the stage, one process per GPU (DeepSpeed ZeRO when the recipe names it)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    from medcritical.orchestration.runner import stage_command  # lazy: see the note at the imports

    return torchrun + stage_command(stage, recipe_path, output_uri, inputs)


def run_data_parallel(stage: Stage, recipe: Recipe, output_uri: str, inputs: dict, gpus: int) -> dict:
    """The stage under torchrun on this pod's `gpus`; each rank's runner keeps the recipe's global batch."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(dump_recipe(recipe), encoding="utf-8")
        command = data_parallel_command(stage, str(recipe_path), output_uri, inputs, gpus)
        log.info("%d GPUs: running the %s stage data-parallel: %s", gpus, stage.name, " ".join(command))
        subprocess.run(command, check=True)
    # The ranks ran in this pod: their output (already published) is still in the local folder.
    return json.loads(stage.stats_path(local_output_path(output_uri)).read_text(encoding="utf-8"))


def reuse_step_output(step: str, uri: str) -> str:
    """An earlier run's output folder used as this run's (the teacher is paid once): checked, then returned.

    The distill component records it as its output's location. A `dsl.importer(artifact_uri=distill_uri,
    artifact_class=dsl.Dataset)` would register the URI as an artifact too (kubeflow.org, "Special Case:
    Importer Components"), but it runs in every run (an empty distill_uri would need dsl.If/dsl.Else and
    dsl.OneOf, another graph) and its s3:// uri is one the launcher downloads whole (see LOCATION below).
    """
    from medcritical.orchestration.runner import STAGES  # lazy: see the note at the imports

    stage = STAGES[step]
    for later in STAGES.values():  # fails now, naming the URI, rather than in the stage that reads it
        for spec in later.inputs.values():
            if spec.default_stage == stage.name and not spec.optional:  # the report does without statistics
                input_file(uri, spec.file)
    log.info("%s: reusing %s (not run again)", step, uri)
    return uri


def numeric_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a step's result, nested keys joined with dots (rollout.pass@1), for the KFP UI."""
    numbers = {}
    for key, value in result.items():
        if isinstance(value, dict):
            numbers.update(numeric_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = value
    return numbers


def task_root(run_root: str, run_id: str) -> str:
    """The folder a pipeline task writes under: `<run_root>/<run_id>` on a cluster, where `run_id` is KFP's
    run id (an input of its own: the driver substitutes the placeholder only as a parameter's whole value);
    `run_root` itself in a local run (no run id)."""
    if "{{" in run_id:
        raise InputError(
            f"run_id {run_id!r} is an unresolved KFP placeholder: this KFP backend did not substitute it; "
            "run the pipeline on a KFP backend of 2.5.0 or later"
        )
    return join_uri(run_root, run_id) if run_id else run_root


def task_recipe(recipe_yaml: str, run_root: str) -> Recipe:
    """The recipe a pipeline task runs with: logging set up for the task, and the pipeline's run_root
    parameter in place of the recipe's run.output_dir (the report reads the stages' statistics there)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_recipe_text(recipe_yaml, checked=True)  # configure checked it in full
    return recipe.model_copy(update={"run": recipe.run.model_copy(update={"output_dir": run_root})})


def log_metrics(metrics, result: dict | None) -> None:
    """A stage's numeric statistics as the task's KFP metrics."""
    for key, value in numeric_metrics(result or {}).items():
        metrics.log_metric(key, value)


def run_component_step(step: str, recipe_yaml: str, run_root: str, name: str, metrics, markdown=None, **inputs) -> str:
    """Run one stage inside a KFP component through the runner; log its numeric statistics; return its
    output URI. `inputs` are the stage's declared inputs (URIs) and options. In `medcritical run` the stage
    runs in a fork of the warm worker, which has torch, transformers and TRL imported already."""

    recipe = task_recipe(recipe_yaml, run_root)
    output_uri = join_uri(run_root, name)
    log.info("step %s -> %s", name, output_uri)
    result = warm_worker.call(execute_step, step, recipe, output_uri, inputs)
    log_metrics(metrics, result)
    if markdown is not None and result and "markdown" in result:
        Path(markdown.path).write_text(result["markdown"], encoding="utf-8")
    return output_uri


def execute_step(step: str, recipe: Recipe, output_uri: str, inputs: dict) -> dict:
    """The stage `step` of a pipeline task, with the recipe's CPU threads, on every GPU of the pod for training."""
    from medcritical.orchestration.runner import STAGES, run_stage  # lazy: see the note at the imports

    recipe.run.apply_threads()
    stage = STAGES[step]
    gpus = visible_gpus() if uses_every_gpu(stage) and "RANK" not in os.environ else 0
    if gpus > 1:
        return run_data_parallel(stage, recipe, output_uri, inputs, gpus)
    return run_stage(stage, recipe, output_uri, **inputs)


# -- Lineage: the steps' folders as KFP artifacts --------------------------------------------------------
# The components hand each other KFP artifacts (Dataset, Model, Metrics, Markdown) so the KFP UI draws
# which data trained which model; the step's folder `<run_root>/<name>` (often s3://) is written in the
# artifact's metadata under LOCATION, and no file is written at the artifact's own path.
#
# Why not the artifact's uri: KFP records a uri the component sets (the executor output's uri replaces the
# planned one before ML Metadata records it: mergeRuntimeArtifacts in kubeflow/pipelines
# backend/src/v2/component/launcher_v2.go), and kfp.local keeps it as written. But the same launcher then
# uploads the local mirror `/s3/<bucket>/<key>` to that uri with the pipeline root's bucket, which fails
# the task for any uri outside the pipeline root ("does not have expected bucket prefix",
# objectstore Config.KeyFromURI), and it downloads every s3:// input artifact whole into the container
# before the component starts (downloadArtifacts; kubeflow/pipelines#5672, to skip such downloads, was
# closed as stale): a model folder and its checkpoints would be copied onto every later pod's root disk
# before the step downloads what it needs itself. With KFP's own (empty) artifact the launcher uploads
# nothing (a missing local path is allowed) and downloads nothing (an empty prefix lists no object).
LOCATION = "location"


def record_location(artifact, uri: str) -> None:
    """Name the step folder `uri` in an output artifact (the KFP UI shows it among the artifact's metadata)."""
    artifact.metadata[LOCATION] = uri


def location_of(artifact) -> str:
    """The step folder an input artifact stands for; "" for an optional input left unconnected (None)."""
    if artifact is None:
        return ""
    if not artifact.metadata.get(LOCATION):
        raise InputError(
            f"input artifact {artifact.name!r} ({artifact.uri}) names no step folder (no {LOCATION!r} in its "
            "metadata): connect it to the output of a MedCritical component, which records its folder there"
        )
    return artifact.metadata[LOCATION]
