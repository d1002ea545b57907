"""The stage contract: what a stage declares so that one runner runs it for every caller.

A stage turns input folders into one output folder. Its package declares it once, in its
``stage.py``: the inputs it reads (which file of which upstream stage, or a model), the files it
writes, the statistics file the run report reads, and the file holding its resume fingerprint
(``io/fingerprint.check_resume``). ``runner.run_stage`` does the rest for the CLI, the KFP
components, the Kubernetes Jobs, the round loop and ``medcritical run``: it finds the inputs
(local paths or ``s3://`` URIs), takes the output folder's lock, calls ``run`` on local paths and
publishes the folder.

Completion is the runner's too, decided from the declaration alone (`runner.finished_stats`): an output
folder holds a *finished* run when

- every required output is there (`Stage.required_outputs`: the declared `outputs` less the `optional` ones,
  which not every run writes, such as a plot or a LoRA adapter, and less the `local_only` ones, never
  published);
- its done marker is whole: for an ``s3://`` folder the manifest the upload writes last (the files are read
  from it, nothing is downloaded); on disk the folder's ``_MANIFEST.json``, when it has one, still matches;
- the recorded fingerprint file equals what this run would record (`Stage.expected_fingerprint`).

Then the runner returns the stored statistics (`stats`, with `extra_stats`) without calling `run`; the
`restart` option always runs. A stage without a fingerprint, or without `expected_fingerprint` (its
fingerprint does not cover every setting its outputs depend on), is run every time and resumes its own way.

Nothing here imports a stage: the declarations import this module, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    # Recipe keys naming files a stage reads besides its inputs (an s3:// value is downloaded first); a function
    # of the recipe when whether it reads them depends on a setting (the rollout reads the teacher only for
    # the teacher corrector: a 32B teacher in S3 is not downloaded for the self arm).
    recipe_files: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    # A model stage that reports {"status": "skipped"} leaves this model input unchanged: its folder
    # then points at that model (runner.MODEL_POINTER) instead of copying the weights.
    unchanged_model: str | None = None
    options: tuple[str, ...] = ()  # the keyword options `run` accepts besides its inputs
    local_only: tuple[str, ...] = ()  # folders kept on the machine, never published (resume state)
    optional: tuple[str, ...] = ()  # outputs a finished run may lack (plots, a LoRA adapter, ...)
    # `(recipe, **inputs, **options) -> dict | None`: the fingerprint this run would record in `fingerprint`,
    # from the local inputs `run` gets; None when it cannot tell (the run then goes ahead). Declared only where
    # that fingerprint covers every setting the outputs depend on: it decides whether the folder is finished.
    expected_fingerprint: Callable[..., dict[str, Any] | None] | None = None
    # Statistics kept in files of their own, added to the stored ones under these keys when present.
    extra_stats: Mapping[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """Its CLI command and its step in `medcritical plan`: prepare-data for the stage prepare_data."""
        return self.name.replace("_", "-")

    def files_in_recipe(self, recipe) -> tuple[str, ...]:
        """The recipe keys naming files this stage reads with this recipe."""
        return self.recipe_files(recipe) if callable(self.recipe_files) else self.recipe_files

    def stats_path(self, folder: str | Path) -> Path:
        return Path(folder) / self.stats

    @property
    def required_outputs(self) -> tuple[str, ...]:
        """The outputs every finished run has published: `outputs` less `optional` and `local_only`."""
        return tuple(o for o in self.outputs if o not in self.optional and o not in self.local_only)
