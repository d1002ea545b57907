"""A stage reads only what it declares: an open for reading inside the run's folders is refused unless it lies
within one of the stage's declared inputs or its own output folder.

`runner._execute` runs every `stage.run(...)` inside `reading_only(...)`. While it runs, an audit hook
(`sys.addaudithook`, the "open" event: builtins.open, io.open, pathlib's read_text, os.open) refuses a
read of a file

- under the *run root* (the output folder's parent: the other stages' folders of this run), or
- in the folder of a file input (another stage's folder, e.g. an earlier run's distill/, or the
  work-folder copy of an s3:// folder an input file was downloaded from),

unless the file lies within a declared input (the file, or a model input's folder; a training stage's
folder when the model input is its model/, whose manifest vouches for the weights), the manifest beside a
declared input file, the output folder, or a file the recipe names for the stage (`Stage.recipe_files`).
Anything else is not the run's layout and is left alone: site-packages, caches, /tmp, the model folders
given as inputs, prompts, and Python's environment and import path even when they lie under the run root
(a run written into a checkout's working directory). An output folder straight under / or the home folder
guards nothing there. Writes (a mode with w, a, x or +; os.open with a write flag) and directories
(an os.open of a folder to fsync it) are not reads and are let through.

What it sees: Python-level opens only. A C extension's own file access (safetensors' mmap, tokenizers in
Rust) and a subprocess (torchrun ranks, a vLLM server) raise no audit event. The scope lives in a context
variable, which a thread started by the stage does not inherit (threads begin with an empty context):
the stage's own code, in the thread the runner calls it in, is guarded; worker threads of the libraries it
uses (downloads, data loaders) are not, and they only read what the stage handed them. Code that should
be guarded in its own thread runs there through `contextvars.copy_context().run`. Stages run side by side
in threads of one process each keep their own scope, which a process-wide flag could not do.

An audit hook cannot be removed: it is installed once, and does nothing (one context-variable lookup) while
no stage runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcritical.io.manifest import MANIFEST_NAME

_WRITE_MODES = frozenset("wax+")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class UndeclaredReadError(RuntimeError):
    """A stage opened a file of the run's layout that it did not declare as an input: a bug in the stage (or
    its declaration), never the user's doing, so not a UserError; not an OSError either, so code that goes on
    without a missing optional file does not swallow it."""


@dataclass(frozen=True)
class _Scope:
    stage: str
    guarded: tuple[str, ...]  # the run root and the folders of file inputs
    allowed: tuple[str, ...]  # declared inputs, their manifests, the output folder, recipe files


_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("medcritical_read_guard", default=None)
_installed = False


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _within(path: str, folders: Iterable[str]) -> bool:
    return any(path == folder or path.startswith(folder.rstrip(os.sep) + os.sep) for folder in folders)


def _is_read(mode: Any, flags: Any) -> bool:
    if isinstance(mode, str):
        return not (_WRITE_MODES & set(mode))
    return not (isinstance(flags, int) and flags & _WRITE_FLAGS)


def _audit(event: str, args: tuple) -> None:
    if event != "open":
        return
    scope = _SCOPE.get()
    if scope is None:
        return
    path, mode, flags = (tuple(args) + (None, None, None))[:3]
    if not isinstance(path, (str, bytes, os.PathLike)) or not _is_read(mode, flags):
        return  # a file descriptor, or a write
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    real = _real(path)
    if not _within(real, scope.guarded) or _within(real, scope.allowed) or os.path.isdir(real):
        return
    raise UndeclaredReadError(
        f"stage {scope.stage} read {path}, a file of the run's folders that is not among its declared inputs "
        f"nor in its output folder: declare it as an input of the {scope.stage} stage (Input(file, beside=...) "
        "or default_stage=...) so every caller finds, downloads and records it, and read it from the path the "
        "runner passes"
    )


def install() -> None:
    """Install the audit hook (once per process; it acts only inside `reading_only`)."""
    global _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True


def _allowed_for(path: Path, model: bool) -> list[Path]:
    if model:
        # A model input is the folder the runner passed; a training stage's model/ comes with its stage folder
        # (the manifest beside model/ vouches for the weights: modeling.check, io.fingerprint read it).
        return [path, path.parent] if path.name == "model" else [path]
    if path.is_dir():
        return [path]
    return [path, path.parent / MANIFEST_NAME]


@contextlib.contextmanager
def reading_only(
    stage: Any, output_dir: Path, inputs: Mapping[str, Path | None], recipe_files: Iterable[Any] = ()
) -> Iterator[None]:
    """Refuse, while the block runs in this thread (and in what it awaits there), a read of the run's
    folders outside `inputs` (the runner's local paths of `stage`'s declared inputs) and `output_dir`.

    `stage` is the declaration (its name, its inputs' kinds); `recipe_files` the files the recipe names for it
    (`Stage.files_in_recipe`'s values, as the runner made them local; an unset one is None)."""
    install()
    output_dir = Path(output_dir)
    specs = getattr(stage, "inputs", {})
    guarded = [output_dir.parent]
    allowed = [output_dir]
    for name, path in inputs.items():
        if path is None:
            continue
        model = getattr(specs.get(name), "is_model", False)
        allowed += _allowed_for(Path(path), model)
        if not model and Path(path).is_file():
            guarded.append(Path(path).parent)  # the folder of another stage: its other files are not declared
    allowed += [Path(value) for value in recipe_files if value]
    # An output straight under / or the home folder would make everything there the run's: not guarded.
    too_wide = {_real(os.sep), _real(Path.home())}
    zones = tuple(zone for zone in dict.fromkeys(_real(p) for p in guarded) if zone not in too_wide)
    allowed_real = [_real(p) for p in allowed] + _code_below(zones)
    scope = _Scope(stage=getattr(stage, "name", str(stage)), guarded=zones, allowed=tuple(dict.fromkeys(allowed_real)))
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _code_below(zones: tuple[str, ...]) -> list[str]:
    """Python's own folders (the environment, the import path) that lie inside a guarded folder: a run written
    into the working directory (`--output sft` in a checkout) must not stop the stage reading its package."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # src/medcritical (prompts, shipped files)
    folders = {package, sys.prefix, sys.base_prefix, sys.exec_prefix, *(entry for entry in sys.path if entry)}
    below = []
    for folder in map(_real, folders):
        if any(folder != zone and _within(folder, [zone]) for zone in zones):
            below.append(folder)
    return below
