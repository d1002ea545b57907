"""Pipeline steps over URIs: what the KFP components, the Kubernetes Jobs and `medcritical run` call.

Each step reads its inputs from URIs (local folders or ``s3://bucket/prefix``), runs the library
function on local files, and publishes its output folder to ``output_uri``. Data flows one way:
data → distill → sft → rollout → dpo (× rounds) → evaluate → report; no step reaches back.

A step's output folder is also its input for the next step: a model is the folder holding
``model/`` (or a Hugging Face folder itself), a dataset the folder holding the step's JSONL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from medcritical import storage
from medcritical.recipe import Recipe, RecipeError, dump_recipe, load_recipe_text

log = logging.getLogger(__name__)

# Output names under the run root; the pipeline and the report agree on them through these.
DATA, DISTILL, SFT, REPORT = "data", "distill", "sft", "report"
EVAL_BASE, EVAL_SFT = "eval-base", "eval-sft"
# A DPO round without pairs leaves the model unchanged: its folder names the model it kept
# (a URI, valid in every pod) instead of copying gigabytes of weights.
MODEL_POINTER = "model.uri"
CHECKPOINTS = "checkpoints"  # the training steps' periodic checkpoints, inside their output folder


def round_name(round_number: int, step: str) -> str:
    return f"round{round_number}-{step}"


def eval_final_name(rounds: int) -> str:
    return f"eval-dpo-round{rounds}"


def join_uri(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def work_dir() -> Path:
    """Local scratch for S3 steps; kept between retries so a rerun resumes ($MEDCRITICAL_WORKDIR)."""
    return Path(os.environ.get("MEDCRITICAL_WORKDIR", Path.home() / ".cache" / "medcritical" / "work"))


def _is_main_process() -> bool:
    # Under torchrun every rank runs the step; only rank 0 publishes.
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def _work_lock() -> Iterator[None]:
    """Serialize downloads into the shared work dir: under torchrun all ranks ask at once."""
    import fcntl

    work_dir().mkdir(parents=True, exist_ok=True)
    with open(work_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def local_output(output_uri: str) -> Iterator[Path]:
    """A local folder to write into; published to `output_uri` when the step succeeds."""
    path = local_output_path(output_uri)
    path.mkdir(parents=True, exist_ok=True)
    yield path
    if storage.is_s3(output_uri) and _is_main_process():
        # Training checkpoints only serve a resume inside this step: the finished step's folder is
        # what later steps download, and a 7B full fine-tune's checkpoints are hundreds of GB.
        storage.upload(path, output_uri, exclude_dirs=(CHECKPOINTS,))


def local_output_path(output_uri: str) -> Path:
    """Where a step writes before publishing: the folder itself, or a scratch folder for an S3 URI."""
    if not storage.is_s3(output_uri):
        return Path(output_uri)
    return work_dir() / "out" / hashlib.sha256(output_uri.encode()).hexdigest()[:16]


def local_input(uri: str) -> Path:
    """A local path for an input URI (S3 files and folders are downloaded once into the work dir)."""
    if not storage.is_s3(uri):
        if not Path(uri).exists():
            raise FileNotFoundError(f"{uri}: no such input; run the step that writes it first")
        return Path(uri)
    with _work_lock():
        return storage.materialize(uri, work_dir() / "in" / hashlib.sha256(uri.encode()).hexdigest()[:16])


def input_file(uri: str, filename: str) -> Path:
    """`uri` may name the file itself or the step folder that holds `filename`."""
    path = local_input(uri)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise FileNotFoundError(f"{uri}: no {filename} there; is this the output of the right step?")
    return path


def resolve_model_uri(recipe: Recipe, model_uri: str) -> Path:
    """"" → the recipe's base model; "tiny" → the offline tiny model; a step folder → its model/,
    or, for a DPO round that had no pairs, the model it left unchanged (see MODEL_POINTER)."""
    from medcritical.modeling import resolve_model
    from medcritical.recipe import TINY

    uri = model_uri or recipe.model.base
    if uri == TINY:
        with _work_lock():  # all torchrun ranks would build it at once
            return resolve_model(TINY, recipe.model.tiny)
    path = local_input(uri)
    if (path / "model" / "config.json").is_file():
        return resolve_model(str(path / "model"))
    if (path / MODEL_POINTER).is_file():
        return resolve_model_uri(recipe, (path / MODEL_POINTER).read_text(encoding="utf-8").strip())
    return resolve_model(str(path))


def _questions(data_uri: str, filename: str, recipe: Recipe):
    from medcritical.data.cmexam import load_questions

    return load_questions(input_file(data_uri, filename), recipe.data.on_bad_row).questions


# -- the steps -------------------------------------------------------------------------------------


def prepare_data(recipe: Recipe, output_uri: str) -> dict:
    from medcritical.data.prepare import prepare_data as prepare

    # An s3:// question file is downloaded first; the loader reads local files.
    local = {key: str(local_input(uri)) for key in ("source", "eval_source") if storage.is_s3(uri := getattr(recipe.data, key) or "")}
    with local_output(output_uri) as out:
        return prepare(recipe.data.model_copy(update=local), recipe.run.seed, out)


def distill(recipe: Recipe, data_uri: str, output_uri: str) -> dict:
    from medcritical.data.prepare import TRAIN_FILE
    from medcritical.distill.run import distill as run_distill

    questions = _questions(data_uri, TRAIN_FILE, recipe)
    with local_output(output_uri) as out:
        return run_distill(recipe.distill, questions, out, seed=recipe.run.seed, device=recipe.run.device)


def sft(recipe: Recipe, distill_uri: str, model_uri: str, output_uri: str) -> dict:
    from medcritical.distill.run import SFT_FILE
    from medcritical.training.sft import train_sft

    dataset = input_file(distill_uri, SFT_FILE)
    model = resolve_model_uri(recipe, model_uri)
    with local_output(output_uri) as out:
        return train_sft(
            recipe.sft, dataset, model, out, device=recipe.run.device, dtype=recipe.model.dtype, seed=recipe.run.seed
        )


def rollout(recipe: Recipe, data_uri: str, model_uri: str, output_uri: str) -> dict:
    from medcritical.data.prepare import TRAIN_FILE
    from medcritical.selfplay.step import run_rollout

    questions = _questions(data_uri, TRAIN_FILE, recipe)
    model = resolve_model_uri(recipe, model_uri)
    with local_output(output_uri) as out:
        return run_rollout(
            recipe.selfplay, recipe.generation, questions, model, out,
            device=recipe.run.device, dtype=recipe.model.dtype, seed=recipe.run.seed,
            distill=recipe.distill,  # the teacher, when selfplay.corrector is "teacher"
        )


def dpo(recipe: Recipe, rollout_uri: str, model_uri: str, output_uri: str, heldout_uri: str = "") -> dict:
    """DPO on the rollout's pairs; held-out pairs from `heldout_uri`, else pairs_heldout.jsonl beside them."""
    from medcritical.selfplay.step import HELDOUT_PAIRS, PAIRS
    from medcritical.training.dpo import train_dpo

    pairs = input_file(rollout_uri, PAIRS)
    heldout = input_file(heldout_uri, HELDOUT_PAIRS) if heldout_uri else pairs.with_name(HELDOUT_PAIRS)
    model = resolve_model_uri(recipe, model_uri)
    with local_output(output_uri) as out:
        result = train_dpo(
            recipe.selfplay.dpo, pairs, heldout if heldout.is_file() else None, model, out,
            device=recipe.run.device, dtype=recipe.model.dtype, seed=recipe.run.seed,
        )
        if result.get("status") == "skipped":
            (out / MODEL_POINTER).write_text(model_uri or recipe.model.base, encoding="utf-8")
        return result


def evaluate(recipe: Recipe, data_uri: str, model_uri: str, output_uri: str, label: str = "") -> dict:
    from medcritical.data.prepare import EVAL_FILE
    from medcritical.evaluation.evaluate import evaluate_model

    questions = _questions(data_uri, EVAL_FILE, recipe)
    model = resolve_model_uri(recipe, model_uri)
    with local_output(output_uri) as out:
        return evaluate_model(
            recipe.evaluate, recipe.generation, questions, model, out,
            device=recipe.run.device, dtype=recipe.model.dtype, label=label or None,
        )


def report(recipe: Recipe, output_uri: str, base_eval_uri: str, sft_eval_uri: str, dpo_eval_uri: str) -> dict:
    from medcritical.evaluation.run_report import write_run_report

    def read_json(uri: str, filename: str) -> dict | None:
        try:
            return json.loads(input_file(uri, filename).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    root = recipe.run.root
    evaluations = {
        "base": read_json(base_eval_uri, "report.json"),
        "sft": read_json(sft_eval_uri, "report.json"),
        "dpo": read_json(dpo_eval_uri, "report.json"),
    }
    stats = {
        "data": read_json(join_uri(root, DATA), "data_stats.json"),
        "distill": read_json(join_uri(root, DISTILL), "distill_stats.json"),
        "sft": read_json(join_uri(root, SFT), "sft_metrics.json"),
        "rounds": [
            {
                "rollout": read_json(join_uri(root, round_name(r, "rollout")), "rollout_stats.json"),
                "dpo": read_json(join_uri(root, round_name(r, "dpo")), "dpo_metrics.json"),
            }
            for r in range(1, recipe.selfplay.rounds + 1)
        ],
    }
    with local_output(output_uri) as out:
        return write_run_report(recipe, evaluations, stats, out)


STEPS = {f.__name__: f for f in (prepare_data, distill, sft, rollout, dpo, evaluate, report)}


# -- KFP glue ---------------------------------------------------------------------------------------


def resolve_recipe_text(
    recipe_yaml: str, rounds: int, overrides: list, base_model: str, teacher_base_url: str, teacher_model: str
) -> str:
    """The pipeline's `configure` step: named knobs and overrides applied, validated, as YAML."""
    named = {"model.base": base_model, "distill.openai.base_url": teacher_base_url, "distill.openai.model": teacher_model}
    assignments = [f"{key}={value}" for key, value in named.items() if value] + list(overrides)
    recipe = load_recipe_text(recipe_yaml, assignments)
    if recipe.selfplay.rounds != rounds:
        raise RecipeError(
            f"selfplay.rounds is {recipe.selfplay.rounds} but this pipeline was compiled for {rounds} rounds; "
            f"recompile with `medcritical compile --set selfplay.rounds={recipe.selfplay.rounds}` (the rounds are "
            "tasks of the compiled graph) or change the recipe"
        )
    return dump_recipe(recipe)


# Training steps that use every GPU of their pod: the component relaunches itself under torchrun.
# step -> (CLI flag, step input) for the training data; the model goes to --model.
DATA_PARALLEL_STEPS = {"sft": ("--dataset", "distill_uri"), "dpo": ("--pairs", "rollout_uri")}


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def data_parallel_command(step: str, recipe_path: str, output_uri: str, inputs: dict, gpus: int) -> list[str]:
    """torchrun over the step's CLI: one process per GPU; DeepSpeed ZeRO when the recipe names it."""
    flag, data_input = DATA_PARALLEL_STEPS[step]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
        "-m", "medcritical.cli", step, "--recipe", recipe_path, flag, inputs[data_input], "--output", output_uri,
    ]
    if inputs.get("model_uri"):
        command += ["--model", inputs["model_uri"]]
    return command


def run_data_parallel(step: str, recipe: Recipe, output_uri: str, inputs: dict, gpus: int) -> dict:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(dump_recipe(recipe), encoding="utf-8")
        command = data_parallel_command(step, str(recipe_path), output_uri, inputs, gpus)
        log.info("%d GPUs: running the %s step data-parallel: %s", gpus, step, " ".join(command))
        subprocess.run(command, check=True)
    # The ranks ran in this pod: their output (already published) is still in the local folder.
    return json.loads((local_output_path(output_uri) / f"{step}_metrics.json").read_text(encoding="utf-8"))


def numeric_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a step's result, nested keys joined with dots (rollout.pass@1), for the KFP UI."""
    numbers = {}
    for key, value in result.items():
        if isinstance(value, dict):
            numbers.update(numeric_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = value
    return numbers


def run_component_step(step: str, recipe_yaml: str, run_root: str, name: str, metrics, markdown=None, **inputs) -> str:
    """Run one step inside a KFP component; log its numeric statistics; return its output URI."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_recipe_text(recipe_yaml)
    if recipe.run.threads:  # each step is its own process: apply the recipe's CPU thread count here too
        import torch

        torch.set_num_threads(recipe.run.threads)
    # The pipeline's run_root parameter wins over the recipe's run.output_dir (the report reads it).
    recipe = recipe.model_copy(update={"run": recipe.run.model_copy(update={"output_dir": run_root})})
    output_uri = join_uri(run_root, name)
    log.info("step %s -> %s", name, output_uri)
    gpus = visible_gpus() if step in DATA_PARALLEL_STEPS and "RANK" not in os.environ else 0
    if gpus > 1:
        result = run_data_parallel(step, recipe, output_uri, inputs, gpus)
    else:
        result = STEPS[step](recipe, output_uri=output_uri, **inputs)
    for key, value in numeric_metrics(result or {}).items():
        metrics.log_metric(key, value)
    if markdown is not None and result and "markdown" in result:
        Path(markdown.path).write_text(result["markdown"], encoding="utf-8")
    return output_uri
