"""Pipeline steps over URIs: what the KFP components, the Kubernetes Jobs and `medcritical run` call.

Each step reads its inputs from URIs (local folders or ``s3://bucket/prefix``), runs the library
function on local files, and publishes its output folder to ``output_uri``. Data flows one way:
data → distill → sft → rollout → dpo (× rounds) → evaluate → report; no step reaches back.

A step's output folder is also its input for the next step: a model is the folder holding
``model/`` (or a Hugging Face folder itself), a dataset the folder holding the step's JSONL.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from medcritical import storage
from medcritical.io.lock import output_lock
from medcritical.io.ranks import is_main_process
from medcritical.recipe import Recipe

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
    if storage.is_s3(output_uri) and is_main_process():
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
    """ "" → the recipe's base model; "tiny" → the offline tiny model; a step folder → its model/,
    or, for a DPO round that had no pairs, the model it left unchanged (see MODEL_POINTER)."""
    from medcritical.modeling import resolve_model
    from medcritical.modeling.config import TINY

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


def model_folder_problem(path: str) -> str | None:
    """What is wrong with a local model path (None when it holds a model): a Hugging Face folder,
    a step folder with model/, or a DPO round's model.uri pointer."""
    folder = Path(path)
    if not folder.is_dir():
        return "no such model folder (use 'tiny', a local Hugging Face folder or a training step's output folder)"
    if any((folder / name).is_file() for name in ("config.json", "model/config.json", MODEL_POINTER)):
        return None
    return "not a model folder: no config.json (nor model/config.json of a training step's output)"


def check_model_uri(uri: str) -> None:
    """Fail before the work: a local model is a Hugging Face folder, a step folder holding model/, or a
    DPO round's pointer (s3:// models are checked when they are downloaded, first thing in the step)."""
    from medcritical.recipe import TINY

    if uri and uri != TINY and not storage.is_s3(uri) and (problem := model_folder_problem(uri)):
        raise FileNotFoundError(f"{uri}: {problem}")


def step(fn):
    """How every step starts, before any work: it takes its output folder's one-writer lock (a second
    run into it stops at once, naming the holder), checks a local model folder, and probes an S3
    output (credentials, bucket, write permission) and aborts the uploads an interrupted run left there."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        output_uri = bound.arguments["output_uri"]
        if "model_uri" in signature.parameters:
            check_model_uri(bound.arguments.get("model_uri") or bound.arguments["recipe"].model.base)
        if not is_main_process():  # torchrun: rank 0 holds the lock and publishes
            return fn(*args, **kwargs)
        with output_lock(local_output_path(output_uri), fn.__name__):
            if storage.is_s3(output_uri):
                storage.check_output(output_uri)
            return fn(*args, **kwargs)

    return run


def _questions(data_uri: str, filename: str, recipe: Recipe):
    from medcritical.data.cmexam import load_questions

    return load_questions(input_file(data_uri, filename), recipe.data.on_bad_row).questions


# -- the steps -------------------------------------------------------------------------------------


@step
def prepare_data(recipe: Recipe, output_uri: str) -> dict:
    from medcritical.data.prepare import prepare_data as prepare

    # An s3:// question file is downloaded first; the loader reads local files.
    local = {
        key: str(local_input(uri))
        for key in ("source", "eval_source")
        if storage.is_s3(uri := getattr(recipe.data, key) or "")
    }
    with local_output(output_uri) as out:
        return prepare(recipe.data.model_copy(update=local), recipe.run.seed, out)


@step
def distill(recipe: Recipe, data_uri: str, output_uri: str) -> dict:
    from medcritical.data.prepare import TRAIN_FILE
    from medcritical.distill.run import distill as run_distill

    questions = _questions(data_uri, TRAIN_FILE, recipe)
    teacher = recipe.distill.teacher_model
    if teacher and storage.is_s3(teacher):  # a local teacher in S3 comes into the work folder like any input
        recipe = recipe.model_copy(
            update={"distill": recipe.distill.model_copy(update={"teacher_model": str(local_input(teacher))})}
        )
    with local_output(output_uri) as out:
        return run_distill(recipe.distill, questions, out, seed=recipe.run.seed, device=recipe.run.device)


@step
def sft(recipe: Recipe, distill_uri: str, model_uri: str, output_uri: str) -> dict:
    from medcritical.distill.run import SFT_FILE
    from medcritical.training.sft import train_sft

    dataset = input_file(distill_uri, SFT_FILE)
    model = resolve_model_uri(recipe, model_uri)
    with local_output(output_uri) as out:
        return train_sft(
            recipe.sft, dataset, model, out, device=recipe.run.device, dtype=recipe.model.dtype, seed=recipe.run.seed
        )


@step
def rollout(recipe: Recipe, data_uri: str, model_uri: str, output_uri: str) -> dict:
    from medcritical.data.prepare import TRAIN_FILE
    from medcritical.selfplay.step import run_rollout

    questions = _questions(data_uri, TRAIN_FILE, recipe)
    model = resolve_model_uri(recipe, model_uri)
    with local_output(output_uri) as out:
        return run_rollout(
            recipe.selfplay,
            recipe.generation,
            questions,
            model,
            out,
            device=recipe.run.device,
            dtype=recipe.model.dtype,
            seed=recipe.run.seed,
            distill=recipe.distill,  # the teacher, when selfplay.corrector is "teacher"
        )


@step
def dpo(recipe: Recipe, rollout_uri: str, model_uri: str, output_uri: str, heldout_uri: str = "") -> dict:
    """DPO on the rollout's pairs; held-out pairs from `heldout_uri`, else pairs_heldout.jsonl beside them."""
    from medcritical.selfplay.step import HELDOUT_PAIRS, PAIRS
    from medcritical.training.dpo import train_dpo

    pairs = input_file(rollout_uri, PAIRS)
    heldout = input_file(heldout_uri, HELDOUT_PAIRS) if heldout_uri else heldout_beside(rollout_uri, pairs)
    model = resolve_model_uri(recipe, model_uri)
    with local_output(output_uri) as out:
        result = train_dpo(
            recipe.selfplay.dpo,
            pairs,
            heldout if heldout.is_file() else None,
            model,
            out,
            device=recipe.run.device,
            dtype=recipe.model.dtype,
            seed=recipe.run.seed,
        )
        if result.get("status") == "skipped":
            (out / MODEL_POINTER).write_text(model_uri or recipe.model.base, encoding="utf-8")
        elif recipe.evaluate.train_pass_questions != 0 and is_main_process():
            result["train_pass"] = _train_pass(recipe, pairs.parent, out)
        return result


def heldout_beside(rollout_uri: str, pairs: Path) -> Path:
    """The held-out pairs next to the training pairs; an S3 URI naming pairs.jsonl itself fetches its
    sibling, or early stopping would silently have nothing to measure."""
    from medcritical.selfplay.step import HELDOUT_PAIRS, PAIRS

    if storage.is_s3(rollout_uri) and rollout_uri.rstrip("/").endswith("/" + PAIRS):
        sibling = rollout_uri.rstrip("/").rsplit("/", 1)[0] + "/" + HELDOUT_PAIRS
        try:
            return input_file(sibling, HELDOUT_PAIRS)
        except FileNotFoundError:
            log.warning("%s: no held-out pairs; DPO runs without early stopping", sibling)
    return pairs.with_name(HELDOUT_PAIRS)


def _train_pass(recipe: Recipe, rollout_dir: Path, out: Path) -> dict | None:
    """pass@1 on the round's training questions before (its rollout) and after DPO (evaluate.train_pass_questions)."""
    from medcritical.data.prepare import TRAIN_FILE
    from medcritical.evaluation.train_pass import train_pass
    from medcritical.io.jsonl import read_jsonl
    from medcritical.selfplay.step import ROLLOUTS

    before = read_jsonl(rollout_dir / ROLLOUTS)
    try:  # the questions' text and options: the data step's training file under the run root
        questions = _questions(join_uri(recipe.run.root, DATA), TRAIN_FILE, recipe)
    except FileNotFoundError as e:
        log.warning("training pass@1 after DPO not measured: %s", e)
        return None
    if not before:
        log.warning("training pass@1 after DPO not measured: no %s beside the pairs in %s", ROLLOUTS, rollout_dir)
        return None
    generation = recipe.generation.model_copy(update={"backend": "transformers"})  # the training image has no vLLM
    return train_pass(
        recipe.selfplay.rollout,
        generation,
        questions,
        before,
        resolve_model_uri(recipe, str(out)),
        out,
        limit=recipe.evaluate.train_pass_questions,
        device=recipe.run.device,
        dtype=recipe.model.dtype,
        seed=recipe.run.seed,
    )


@step
def evaluate(
    recipe: Recipe, data_uri: str, model_uri: str, output_uri: str, label: str = "", restart: bool = False
) -> dict:
    from medcritical.data.prepare import EVAL_FILE
    from medcritical.evaluation.evaluate import evaluate_model

    questions = _questions(data_uri, EVAL_FILE, recipe)
    model = resolve_model_uri(recipe, model_uri)
    with local_output(output_uri) as out:
        return evaluate_model(
            recipe.evaluate,
            recipe.generation,
            questions,
            model,
            out,
            device=recipe.run.device,
            dtype=recipe.model.dtype,
            label=label or None,
            restart=restart,
        )


@step
def report(recipe: Recipe, output_uri: str, base_eval_uri: str, sft_eval_uri: str, dpo_eval_uri: str) -> dict:
    from medcritical.report import write_run_report

    def read_json(uri: str, filename: str) -> dict | None:
        try:
            return json.loads(input_file(uri, filename).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def read_correct(uri: str) -> dict | None:
        from medcritical.evaluation.compare import correct_by_id

        try:
            return correct_by_id(input_file(uri, "graded.jsonl"))
        except FileNotFoundError:
            return None

    root = recipe.run.root
    eval_uris = {"base": base_eval_uri, "sft": sft_eval_uri, "dpo": dpo_eval_uri}
    evaluations = {name: read_json(uri, "report.json") for name, uri in eval_uris.items()}
    correct = {name: read_correct(uri) for name, uri in eval_uris.items() if evaluations[name]}
    stats = {
        "data": read_json(join_uri(root, DATA), "data_stats.json"),
        "distill": read_json(join_uri(root, DISTILL), "distill_stats.json"),
        "sft": read_json(join_uri(root, SFT), "sft_metrics.json"),
        "rounds": [
            {
                "rollout": read_json(join_uri(root, round_name(r, "rollout")), "rollout_stats.json"),
                "dpo": read_json(join_uri(root, round_name(r, "dpo")), "dpo_metrics.json"),
                "train_pass": read_json(join_uri(root, round_name(r, "dpo")), "train_pass.json"),
            }
            for r in range(1, recipe.selfplay.rounds + 1)
        ],
    }
    with local_output(output_uri) as out:
        return write_run_report(recipe, evaluations, stats, out, correct_by_model=correct)


STEPS = {f.__name__: f for f in (prepare_data, distill, sft, rollout, dpo, evaluate, report)}
