"""The stage contract: what a stage declares so that one runner runs it for every caller.

A stage turns input folders into one output folder. Its package declares it once, in its
``stage.py``: the inputs it reads (which file of which upstream stage, or a model), the files it
writes, the statistics file the run report reads, and the file holding its resume fingerprint
(``io/fingerprint.check_resume``). ``runner.run_stage`` does the rest for the CLI, the KFP
components, the Kubernetes Jobs, the round loop and ``medcritical run``: it finds the inputs
(local paths or ``s3://`` URIs), takes the output folder's lock, calls ``run`` on local paths and
publishes the folder.

Nothing here imports a stage: the declarations import this module, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# What a stage's folder is to the stages after it; also the KFP artifact type of its output.
Kind = Literal["dataset", "model", "metrics"]


@dataclass(frozen=True)
class Input:
    """One input of a stage.

    `file` is the file read from the upstream folder (an input URI may also name that file itself);
    `file=None` means a model: a Hugging Face folder, a training stage's folder, "tiny", or empty for
    the recipe's `model.base`. An input not given defaults to the folder of the stage named
    `default_stage` under the run root, or, with `beside`, to `file` next to another input's file. An `optional`
    input that is missing is passed to `run` as None.
    """

    file: str | None = None
    default_stage: str | None = None  # a stage name
    beside: str | None = None
    optional: bool = False

    @property
    def is_model(self) -> bool:
        return self.file is None


MODEL = Input()  # a model input: the recipe's base model unless given
# An option the runner itself fills: the URI the stage's folder is published to (a training stage keeps its
# checkpoints beside it in S3, where a new pod resumes from). Callers never pass it.
OUTPUT_URI = "output_uri"


@dataclass(frozen=True)
class Stage:
    """A stage's declaration; `run(recipe, output_dir, **inputs, **options) -> statistics`.

    `run` gets one local `Path` per declared input (a model as its Hugging Face folder), the local
    output folder, and the options its caller gives (e.g. `restart`, `label`).
    """

    name: str  # the CLI command and the KFP component
    folder: str  # its folder under a run root (rounds: round<r>-<folder>)
    section: str  # the recipe section it owns
    run: Callable[..., dict[str, Any]]
    inputs: Mapping[str, Input]
    outputs: tuple[str, ...]  # what it writes into its folder
    stats: str  # the statistics file the run report reads
    fingerprint: str | None  # the file recording what its outputs were made from (None: rebuilt every run)
    produces: Kind = "dataset"
    # Recipe keys naming files a stage reads besides its inputs (an s3:// value is downloaded first).
    recipe_files: tuple[str, ...] = ()
    # A model stage that reports {"status": "skipped"} leaves this model input unchanged: its folder
    # then points at that model (runner.MODEL_POINTER) instead of copying the weights.
    unchanged_model: str | None = None
    options: tuple[str, ...] = ()  # the keyword options `run` accepts besides its inputs
    local_only: tuple[str, ...] = ()  # folders kept on the machine, never published (resume state)

    @property
    def command(self) -> str:
        """Its CLI command and its step in `medcritical plan`: prepare-data for the stage prepare_data."""
        return self.name.replace("_", "-")

    def stats_path(self, folder: str | Path) -> Path:
        return Path(folder) / self.stats
