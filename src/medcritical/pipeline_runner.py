"""Running the pipeline: on this machine (KFP local runner), compiled for a cluster, or submitted."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import yaml

from medcritical import storage
from medcritical.recipe import Recipe
from medcritical.steps import REPORT, join_uri

log = logging.getLogger(__name__)


def recipe_parameter(recipe: Recipe) -> str:
    """The recipe as the pipeline's `recipe` parameter: one-line JSON (valid YAML), because KFP writes
    parameter defaults into a comment header that a multi-line value would break."""
    return json.dumps(recipe.model_dump(mode="json"), ensure_ascii=False)


def _pipeline(recipe: Recipe, cluster=None, cache_teacher: bool = False):
    from medcritical.pipelines.medcritical_pipeline import build_pipeline

    return build_pipeline(recipe_parameter(recipe), recipe.run.root, recipe.selfplay.rounds, cluster, cache_teacher)


def run_locally(recipe: Recipe) -> Path:
    """Run every step as a subprocess of this Python through KFP's local runner; return the report folder."""
    from kfp import local

    root = recipe.run.root
    # KFP's local runner needs a local pipeline_root (an s3:// root silently becomes a folder "s3:"):
    # it only holds KFP's own small outputs; the steps write to run.output_dir themselves.
    kfp_root = Path(tempfile.mkdtemp(prefix="kfp-")) if storage.is_s3(root) else Path(root) / "kfp-local"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(kfp_root), raise_on_error=True)
    started = time.perf_counter()
    log.info("running the MedCritical pipeline locally: %d self-play round(s), outputs in %s", recipe.selfplay.rounds, root)
    _pipeline(recipe)()
    log.info("pipeline finished in %.0f s", time.perf_counter() - started)
    report_uri = join_uri(root, REPORT)
    if storage.is_s3(report_uri):
        return storage.materialize(report_uri, Path(tempfile.mkdtemp(prefix="report-")))
    return Path(report_uri)


def compile_pipeline(recipe: Recipe, output: str | Path, *, registry: str = "", shm_size: str = "16Gi",
                     cache_teacher: bool = False) -> Path:
    """Compile the cluster pipeline (images from `registry`) with `recipe` as its default recipe."""
    from kfp import compiler

    from medcritical.pipelines.medcritical_pipeline import ClusterSettings, image_names

    cluster = ClusterSettings(shm_size=shm_size, images=image_names(registry))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(_pipeline(recipe, cluster, cache_teacher), str(output))
    return output


def parse_params(params: list[str]) -> dict:
    parsed = {}
    for param in params:
        name, sep, value = param.partition("=")
        if not sep:
            raise ValueError(f"--param {param!r}: expected NAME=VALUE, e.g. --param train_gpus=8")
        parsed[name.strip()] = yaml.safe_load(value)
    return parsed


def submit_run(recipe: Recipe, host: str, *, experiment: str, run_name: str | None, params: list[str],
               registry: str = "", shm_size: str = "16Gi", cache_teacher: bool = False, client=None):
    """Compile for `recipe` and create a run on the KFP server at `host`; returns kfp's RunPipelineResult."""
    import kfp

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(recipe, Path(tmp) / "medcritical.yaml", registry=registry, shm_size=shm_size,
                                   cache_teacher=cache_teacher)
        client = client or kfp.Client(host=host)
        return client.create_run_from_pipeline_package(
            str(package),
            arguments={"recipe": recipe_parameter(recipe), "run_root": recipe.run.root, **parse_params(params)},
            run_name=run_name or recipe.run.name,
            experiment_name=experiment,
        )
