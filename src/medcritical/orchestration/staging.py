"""Where stages read and write: local paths or ``s3://bucket/prefix`` URIs, and the run root's layout.

A stage's inputs are URIs of earlier stages' folders (or of one file in them); an S3 input is
downloaded once into the work folder. A stage writes into a local folder that is published to its
output URI when it succeeds. Under a run root, each stage has its folder, named here (`stage_folder`,
`eval_folder`, `final_eval_folder`) for every caller: the runner, the pipeline, the round loop and `arms`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from filelock import FileLock

from medcritical import storage
from medcritical.core.stage import Stage
from medcritical.errors import MissingInputError, UserError
from medcritical.io.manifest import check_integrity
from medcritical.io.ranks import is_main_process
from medcritical.modeling import resolve_model
from medcritical.modeling.check import check_model_folder
from medcritical.modeling.config import TINY
from medcritical.orchestration.recipe import Recipe
from medcritical.storage.folders import is_complete_folder

# A model stage that left its model unchanged (a DPO round without pairs) names that model in this
# file (a URI, valid in every pod) instead of copying gigabytes of weights.
MODEL_POINTER = "model.uri"


def join_uri(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def stage_folder(stage: Stage, round_number: int | None = None) -> str:
    """A stage's folder under a run root: data, distill, sft, round1-rollout, round1-dpo, ..., report."""
    return f"round{round_number}-{stage.folder}" if round_number else stage.folder


def stage_uri(root: str, stage: Stage, round_number: int | None = None) -> str:
    return join_uri(root, stage_folder(stage, round_number))


def eval_folder(model: str) -> str:
    """The evaluation of one model under a run root: eval-base, eval-sft, eval-dpo-round2."""
    return f"eval-{model}"


def final_model_label(rounds: int) -> str:
    """The final model's name after `rounds` self-play rounds (its evaluation: eval-dpo-round<R>)."""
    return f"dpo-round{rounds}"


def final_eval_folder(last_round: int) -> str:
    """The final model's evaluation under a run root: eval-dpo-round<R>, R the last round that ran. A round
    loop that stops early (a round without pairs) names it after that round too, as the pipeline does,
    whose skipped round's folder points at the unchanged model."""
    return eval_folder(final_model_label(last_round))


def read_stats(root: str, stage: Stage, round_number: int | None = None, filename: str | None = None) -> dict | None:
    """A stage's statistics file (or another JSON file of its folder) under a run root; None if it did not run."""
    try:
        path = folder_file(stage_uri(root, stage, round_number), filename or stage.stats)
    except FileNotFoundError:
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def sibling_uri(uri: str, filename: str, sibling: str) -> str:
    """`sibling` next to the file `filename` that `uri` names, or in the folder `uri` names."""
    uri = uri.rstrip("/")
    if uri.endswith("/" + filename) or uri == filename:
        return join_uri(uri.rpartition("/")[0] or ".", sibling)
    return uri


def work_dir() -> Path:
    """Local scratch for S3 steps; kept between retries so a rerun resumes ($MEDCRITICAL_WORKDIR)."""
    return Path(os.environ.get("MEDCRITICAL_WORKDIR", Path.home() / ".cache" / "medcritical" / "work"))


@contextlib.contextmanager
def _work_lock() -> Iterator[None]:
    """Serialize downloads into the shared work dir: under torchrun all ranks ask at once."""
    work_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(work_dir() / ".lock"):
        yield


def local_output_path(output_uri: str) -> Path:
    """Where a step writes before publishing: the folder itself, or a scratch folder for an S3 URI."""
    if not storage.is_s3(output_uri):
        return Path(output_uri)
    return work_dir() / "out" / hashlib.sha256(output_uri.encode()).hexdigest()[:16]


@contextlib.contextmanager
def local_output(output_uri: str, keep_local: Sequence[str] = ()) -> Iterator[Path]:
    """A local folder to write into; published to `output_uri` when the step succeeds, except the
    folders named in `keep_local` (resume state such as checkpoints)."""
    path = local_output_path(output_uri)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except UserError as e:  # a message about an S3 output names its URI, not the local scratch folder
        if not (storage.is_s3(output_uri) and str(path) in str(e)):
            raise
        try:
            renamed = type(e)(str(e).replace(str(path), output_uri))
        except TypeError:  # an error type made from other arguments: as it is
            raise e from None
        raise renamed from e
    if storage.is_s3(output_uri) and is_main_process():
        storage.upload(path, output_uri, exclude_dirs=tuple(keep_local))


def local_input(uri: str) -> Path:
    """A local path for an input URI (S3 files and folders are downloaded once into the work dir)."""
    if not storage.is_s3(uri):
        if not Path(uri).exists():
            raise MissingInputError(f"{uri}: no such input; run the step that writes it first")
        return Path(uri)
    with _work_lock():
        return storage.materialize(uri, work_dir() / "in" / hashlib.sha256(uri.encode()).hexdigest()[:16])


def input_file(uri: str, filename: str) -> Path:
    """`uri` may name the file itself or the step folder that holds `filename`. Of a complete s3:// step folder
    only that file comes down: the report's SFT statistics must not bring the model with them."""
    path = _file_of_s3_folder(uri, filename) or local_input(uri)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise MissingInputError(f"{uri}: no {filename} there; is this the output of the right step?")
    check_integrity(path.parent, under=path.name)  # unchanged since its step wrote it (when it has a manifest)
    return path


def _file_of_s3_folder(uri: str, filename: str) -> Path | None:
    """`filename` of the s3:// step folder `uri`, fetched alone once the folder is complete (its manifest, written
    last, is there: a reader never sees half an upload); the object is checked against the sha256 it was uploaded
    with. None when `uri` is local, names a file, or is no complete folder: then it is fetched as it is."""
    if not storage.is_s3(uri) or uri.rstrip("/").endswith("/" + filename) or not is_complete_folder(uri):
        return None
    try:
        return local_input(join_uri(uri, filename))
    except FileNotFoundError:  # not in the folder: the whole folder's error says so
        return None


def folder_file(folder_uri: str, filename: str) -> Path:
    """One file of a stage's folder, fetched alone: reading a training stage's statistics must not download
    its model (an S3 folder URI given to `input_file` is downloaded whole)."""
    return input_file(join_uri(folder_uri, filename), filename)


def resolve_model_uri(recipe: Recipe, model_uri: str) -> Path:
    """The local model folder for a model input: "" → the recipe's model.base; "tiny" → the
    offline tiny model; a step folder → its model/, or, for a DPO round that had no pairs, the model it
    left unchanged (see MODEL_POINTER); else a Hugging Face folder."""
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
    if uri and uri != TINY and not storage.is_s3(uri) and (problem := model_folder_problem(uri)):
        raise MissingInputError(f"{uri}: {problem}")
    if uri and uri != TINY and not storage.is_s3(uri) and not (Path(uri) / MODEL_POINTER).is_file():
        folder = Path(uri) / "model" if (Path(uri) / "model" / "config.json").is_file() else Path(uri)
        check_model_folder(folder)  # loadable, and unchanged since its step wrote it
