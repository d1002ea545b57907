"""The one runner: every caller runs a stage through `run_stage`.

The CLI commands, the KFP components (kfp_runtime), the Kubernetes Jobs (which run the CLI), the
single-process round loop (rounds.py) and `medcritical run` (the pipeline, whose tasks are the
components) all call

    run_stage(ROLLOUT, recipe, "s3://bucket/run/round1-rollout", data="s3://bucket/run/data", model=...)

From the stage's declaration (medcritical.core.stage) it: checks a local model input, takes the output
folder's one-writer lock (a second run into it stops at once, naming the holder), probes an S3 output
(credentials, bucket, write permission) and aborts the uploads an interrupted run left there, finds
every input (a given URI, else the declared default), downloads S3 inputs and recipe files, calls the
stage on local paths, and publishes the output folder. Data flows one way:

    data → distill → sft → R × (rollout → dpo) → evaluate → report
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from medcritical import storage
from medcritical.core.stage import OUTPUT_URI, Stage
from medcritical.data.stage import PREPARE_DATA
from medcritical.distill.stage import DISTILL
from medcritical.errors import UserError
from medcritical.evaluation.stage import EVALUATE
from medcritical.io.fingerprint import matches as fingerprint_matches
from medcritical.io.lock import output_lock
from medcritical.io.manifest import MANIFEST_NAME, ManifestError, check_integrity, decode
from medcritical.io.ranks import is_main_process
from medcritical.io.read_guard import reading_only
from medcritical.orchestration.recipe import Recipe, RecipeError
from medcritical.orchestration.report import REPORT
from medcritical.orchestration.staging import (
    MODEL_POINTER,
    check_model_uri,
    input_file,
    join_uri,
    local_input,
    local_output,
    local_output_path,
    resolve_model_uri,
    sibling_uri,
    stage_uri,
)
from medcritical.selfplay.stage import DPO, ROLLOUT
from medcritical.storage.folders import read_small_object, remove_folder
from medcritical.storage.lease import writer_lease
from medcritical.training.stage import SFT

log = logging.getLogger(__name__)

# In data-flow order.
STAGES: dict[str, Stage] = {s.name: s for s in (PREPARE_DATA, DISTILL, SFT, ROLLOUT, DPO, EVALUATE, REPORT)}


def run_stage(stage: Stage, recipe: Recipe, output_uri: str, **given: Any) -> dict:
    """Run `stage` into `output_uri`; `given` holds input URIs by the declared names, and the stage's options.

    An input not given takes its declared default; a model input not given is the recipe's model.base.
    Returns the stage's statistics (also written into its folder).
    """
    unknown = given.keys() - stage.inputs.keys() - set(stage.options)
    if unknown:
        raise TypeError(f"stage {stage.name} has no input or option {', '.join(sorted(unknown))}")
    uris = {name: given[name] for name in stage.inputs if given.get(name)}
    options = {name: given[name] for name in stage.options if name in given}
    if OUTPUT_URI in stage.options:
        options[OUTPUT_URI] = output_uri
    for name, spec in stage.inputs.items():
        if spec.is_model:
            check_model_uri(uris.get(name) or recipe.model.base)
    recipe = keep_global_batch(stage, recipe, world_size())
    if not is_main_process():  # torchrun: rank 0 holds the lock and publishes
        return _execute(stage, recipe, output_uri, uris, options)
    with output_lock(local_output_path(output_uri), stage.name), contextlib.ExitStack() as s3:
        if storage.is_s3(output_uri):  # a worker with its own work folder: the lease in S3 is the lock
            s3.enter_context(writer_lease(output_uri, stage.name))
            storage.check_output(output_uri)
        return _execute(stage, recipe, output_uri, uris, options)


def world_size() -> int:
    """The number of data-parallel ranks this process is one of (torchrun, a TrainJob: WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def keep_global_batch(stage: Stage, recipe: Recipe, world: int) -> Recipe:
    """The recipe for one of `world` data-parallel ranks, with the global batch the recipe gives on one GPU
    (per_device_train_batch_size x gradient_accumulation_steps): the accumulation is divided by the world
    size, or the run is refused (another batch would change the method). The one place this happens: every
    caller (single process, torchrun in a pod, a TrainJob's nodes) runs its stage through `run_stage`."""
    if stage.produces != "model" or world <= 1:
        return recipe
    key = f"{stage.section}.trainer"
    section = recipe_value(recipe, stage.section)
    accumulation = section.settings.get("gradient_accumulation_steps", 1)
    batch = section.settings["per_device_train_batch_size"] * accumulation
    if accumulation % world:
        raise RecipeError(
            f"{key}.gradient_accumulation_steps is {accumulation}, not a multiple of the {world} data-parallel "
            f"ranks (WORLD_SIZE): the global batch (per_device_train_batch_size x accumulation x ranks) would "
            f"not be the recipe's {batch}. Recipes give the batch of one GPU: set {key}.gradient_accumulation_steps "
            f"to a multiple of {world}, or run on a number of GPUs that divides it"
        )
    if is_main_process():
        log.info(
            "%s on %d ranks: %s.gradient_accumulation_steps %d -> %d, global batch kept at %d",
            stage.name,
            world,
            key,
            accumulation,
            accumulation // world,
            batch,
        )
    trainer = section.trainer | {"gradient_accumulation_steps": accumulation // world}
    return with_recipe_value(recipe, stage.section, section.model_copy(update={"trainer": trainer}))


def _execute(stage: Stage, recipe: Recipe, output_uri: str, uris: dict[str, str], options: dict) -> dict:
    recipe = _local_recipe_files(stage, recipe)
    paths = local_inputs(stage, recipe, uris)
    finished = finished_stats(stage, recipe, output_uri, paths, options)
    if finished is not None:
        return finished
    with local_output(output_uri, keep_local=stage.local_only) as out:
        recipe_files = [recipe_value(recipe, key) for key in stage.files_in_recipe(recipe)]
        with reading_only(stage, out, paths, recipe_files):  # an undeclared read of the run's folders is refused
            result = stage.run(recipe, out, **paths, **options)
        if stage.unchanged_model and result.get("status") == "skipped":
            (out / MODEL_POINTER).write_text(uris.get(stage.unchanged_model) or recipe.model.base, encoding="utf-8")
    _discard_remote_resume_state(stage, recipe, output_uri)
    return result


def finished_stats(
    stage: Stage, recipe: Recipe, output_uri: str, paths: dict[str, Path | None], options: dict
) -> dict | None:
    """The stored statistics when `output_uri` already holds the finished run of `stage` on these inputs, else
    None (the rule: medcritical.core.stage). Only what decides it is read: an S3 folder's manifest, fingerprint and
    statistics, never the folder itself; the fingerprint is computed last (it may hash the model's weights)."""
    if stage.fingerprint is None or stage.expected_fingerprint is None or options.get("restart"):
        return None
    folder = _FinishedFolder(output_uri)
    if not folder.complete() or any(not folder.has(o) for o in stage.required_outputs):
        return None
    recorded = folder.read(stage.fingerprint)
    if recorded is None:
        return None
    expected = stage.expected_fingerprint(recipe, **paths, **{k: v for k, v in options.items() if k != OUTPUT_URI})
    if expected is None or not fingerprint_matches(recorded, expected):
        return None  # the stage's own resume check then goes on from it, or names what changed
    try:
        stats = json.loads(folder.read(stage.stats) or b"null")
        if not isinstance(stats, dict):
            return None
        for key, name in stage.extra_stats.items():
            if (extra := folder.read(name)) is not None:
                stats[key] = json.loads(extra)
    except ValueError:  # a damaged statistics file: the run makes it again
        return None
    log.info(
        "%s: %s already holds this finished run (same %s); not run again (--restart runs it again)",
        stage.name,
        output_uri,
        stage.fingerprint,
    )
    return stats


class _FinishedFolder:
    """An output folder as the completion check reads it: on disk, or an S3 prefix through its manifest."""

    def __init__(self, output_uri: str):
        self.uri = output_uri
        self.remote = storage.is_s3(output_uri)
        self.listing: set[str] | None = None

    def complete(self) -> bool:
        """Its done marker is whole: the manifest an S3 upload writes last; on disk, a manifest still matching."""
        if not self.remote:
            try:
                check_integrity(self.uri)
            except (ManifestError, OSError) as e:
                log.info("%s: not a finished run (%s)", self.uri, e)
                return False
            return True
        body = read_small_object(join_uri(self.uri, MANIFEST_NAME))
        if body is None:
            return False
        try:
            self.listing = {e.path for e in decode(body, join_uri(self.uri, MANIFEST_NAME))} | {MANIFEST_NAME}
        except ManifestError as e:
            log.info("%s: not a finished run (%s)", self.uri, e)
            return False
        return True

    def has(self, name: str) -> bool:
        if self.listing is None:
            return (Path(self.uri) / name).exists()
        return name in self.listing or any(p.startswith(f"{name}/") for p in self.listing)

    def read(self, name: str) -> bytes | None:
        if self.listing is None:
            path = Path(self.uri) / name
            return path.read_bytes() if path.is_file() else None
        return read_small_object(join_uri(self.uri, name)) if name in self.listing else None


def _discard_remote_resume_state(stage: Stage, recipe: Recipe, output_uri: str) -> None:
    """Once a training stage's output is published, the checkpoints it mirrored beside it in S3 (its `local_only`
    folders, for a new pod to resume from) have done their work: removed, unless the recipe section keeps them
    (`keep_checkpoints`). At 7B full fine-tuning each one holds about 100 GB of optimizer state."""
    if not (storage.is_s3(output_uri) and is_main_process() and stage.local_only):
        return
    if getattr(recipe_value(recipe, stage.section), "keep_checkpoints", True):
        return
    for folder in stage.local_only:
        remove_folder(f"{output_uri.rstrip('/')}/{folder}")


def local_inputs(stage: Stage, recipe: Recipe, uris: dict[str, str]) -> dict[str, Path | None]:
    """The local path of every input of `stage` (S3 inputs downloaded), by its declared name."""
    return {name: _local_path(stage, name, uris, recipe) for name in stage.inputs}


def _local_path(stage: Stage, name: str, uris: dict[str, str], recipe: Recipe) -> Path | None:
    """The local path of one input: given, or its declared default; None for a missing optional one."""
    spec = stage.inputs[name]
    if spec.is_model:
        return resolve_model_uri(recipe, uris.get(name, ""))
    uri = uris.get(name)
    if uri is None and spec.beside and uris.get(spec.beside):
        uri = sibling_uri(uris[spec.beside], stage.inputs[spec.beside].file, spec.file)
    elif uri is None and spec.default_stage:
        uri = stage_uri(recipe.run.root, STAGES[spec.default_stage])
    if uri is None and spec.optional:
        return None
    if uri is None:
        raise UserError(f"stage {stage.name}: no {name} input given; give the URI of the folder holding {spec.file}")
    try:
        return input_file(uri, spec.file)
    except FileNotFoundError as e:
        if spec.optional:
            log.warning("%s: no %s input (%s); going on without it", stage.name, name, e)
            return None
        raise


def stage_command(stage: Stage, recipe_path: str, output_uri: str, inputs: dict[str, str]) -> list[str]:
    """The arguments after `python` that run `stage` through this runner in another process (a torchrun
    rank, a TrainJob node): `-m medcritical.cli stage <name> --recipe ... --input name=uri ... --output ...`."""
    command = ["-m", "medcritical.cli", "stage", stage.name, "--recipe", recipe_path]
    for name, uri in inputs.items():
        if uri:
            command += ["--input", f"{name}={uri}"]
    return command + ["--output", output_uri]


def recipe_value(recipe: Recipe, dotted: str):
    """The recipe's value (or section) at a dotted key, e.g. "selfplay.dpo"."""
    value = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def with_recipe_value(recipe: Recipe, dotted: str, value) -> Recipe:
    """A copy of the recipe with `value` at the dotted key."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return recipe.model_copy(update={head: value})
    return recipe.model_copy(update={head: with_recipe_value(getattr(recipe, head), rest, value)})


def _local_recipe_files(stage: Stage, recipe: Recipe) -> Recipe:
    """The recipe with the s3:// files its stage reads (e.g. data.source) downloaded into the work folder."""
    for key in stage.files_in_recipe(recipe):
        value = recipe_value(recipe, key)
        if value and storage.is_s3(value):
            recipe = with_recipe_value(recipe, key, str(local_input(value)))
    return recipe
