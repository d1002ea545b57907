"""Running the pipeline: on this machine (KFP local runner), compiled for a cluster, or submitted."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from medcritical import storage
from medcritical.errors import InputError, MissingInputError, StepError
from medcritical.pipelines.medcritical_pipeline import ClusterSettings, build_pipeline, image_names
from medcritical.recipe import Recipe
from medcritical.report import REPORT
from medcritical.staging import join_uri

log = logging.getLogger(__name__)


def recipe_parameter(recipe: Recipe) -> str:
    """The recipe as the pipeline's `recipe` parameter: one-line JSON (valid YAML), because KFP writes
    parameter defaults into a comment header that a multi-line value would break."""
    return json.dumps(recipe.model_dump(mode="json"), ensure_ascii=False)


def _pipeline(recipe: Recipe, cluster=None, cache_teacher: bool = False):

    return build_pipeline(recipe_parameter(recipe), recipe.run.root, recipe.selfplay.rounds, cluster, cache_teacher)


def run_locally(recipe: Recipe) -> Path:
    """Run every step as a subprocess of this Python through KFP's local runner; return the report folder.

    KFP's runner prints every executor's input and output JSON; that goes to `pipeline.log` and the
    console shows the steps and what they report.
    """
    from kfp import local

    root = recipe.run.root
    # KFP's local runner needs a local pipeline_root (an s3:// root silently becomes a folder "s3:"):
    # it only holds KFP's own small outputs; the steps write to run.output_dir themselves.
    kfp_root = Path(tempfile.mkdtemp(prefix="kfp-")) if storage.is_s3(root) else Path(root) / "kfp-local"
    kfp_root.mkdir(parents=True, exist_ok=True)
    log_path = kfp_root / "pipeline.log"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(kfp_root), raise_on_error=True)
    started = time.perf_counter()
    log.info(
        "running the MedCritical pipeline locally: %d self-play round(s), outputs in %s", recipe.selfplay.rounds, root
    )
    log.info("full log (every step's output): %s", log_path)
    with open(log_path, "a", encoding="utf-8") as log_file:
        echo = ConsoleEcho(log_file, sys.stdout, started)
        try:
            with contextlib.redirect_stdout(echo), warnings.catch_warnings():
                # Expected locally: the steps run in this Python, not in their images; names are for the UI.
                warnings.filterwarnings(
                    "ignore", message=".*(non-Python base image|no effect in the current local runner)"
                )
                _pipeline(recipe)()
        except Exception:
            echo.flush()
            log_file.flush()
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
            log.error("the pipeline failed; the end of %s:\n%s", log_path, "\n".join(tail))
            raise
    log.info("pipeline finished in %.0f s", time.perf_counter() - started)
    report_uri = join_uri(root, REPORT.folder)
    if storage.is_s3(report_uri):
        return storage.materialize(report_uri, Path(tempfile.mkdtemp(prefix="report-")))
    return Path(report_uri)


class ConsoleEcho(io.TextIOBase):
    """Everything to the log file; to the console only the lines a person follows a run by."""

    ANSI = re.compile(r"\x1b\[[0-9;]*m")
    TASK = re.compile(
        r"(Executing task '(?P<start>[^']+)'|Task '(?P<done>[^']+)' finished with status (?P<status>\w+)"
        r"|Pipeline '[^']+' finished with status (?P<pipeline>\w+))"
    )
    # Our steps' log lines, as KFP's executor formats them inside the step's process.
    STEP_LINE = re.compile(r"^\s*\[KFP Executor [^\]]* (?P<level>INFO|WARNING|ERROR|CRITICAL)\]: (?P<message>.*)$")
    KFP_CHATTER = ("Looking for component", "Loading KFP component", "Got executor_input", "Wrote executor output")

    def __init__(self, log_file, console, started: float):
        self.log_file, self.console, self.started = log_file, console, started
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log_file.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._echo(self.ANSI.sub("", line))
        return len(text)

    def _echo(self, line: str) -> None:
        clock = f"[{time.perf_counter() - self.started:5.0f} s]"
        if match := self.TASK.search(line):
            if match["start"]:
                print(f"{clock} {match['start']} ...", file=self.console, flush=True)
            elif match["done"]:
                print(f"{clock} {match['done']}: {match['status'].lower()}", file=self.console, flush=True)
            else:
                print(f"{clock} pipeline: {match['pipeline'].lower()}", file=self.console, flush=True)
        elif (match := self.STEP_LINE.match(line)) and not match["message"].startswith(self.KFP_CHATTER):
            prefix = "" if match["level"] == "INFO" else f"{match['level']}: "
            print(f"         {prefix}{match['message']}", file=self.console, flush=True)


def compile_pipeline(
    recipe: Recipe,
    output: str | Path,
    *,
    registry: str = "",
    shm_size: str = "16Gi",
    cache_teacher: bool = False,
    work_pvc: str = "",
) -> Path:
    """Compile the cluster pipeline (images from `registry`) with `recipe` as its default recipe."""
    from kfp import compiler

    cluster = ClusterSettings(shm_size=shm_size, images=image_names(registry), work_pvc=work_pvc)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(_pipeline(recipe, cluster, cache_teacher), str(output))
    return output


def parse_params(params: list[str]) -> dict:
    parsed = {}
    for param in params:
        name, sep, value = param.partition("=")
        if not sep:
            raise InputError(f"--param {param!r}: expected NAME=VALUE, e.g. --param train_gpus=8")
        parsed[name.strip()] = yaml.safe_load(value)
    return parsed


def check_host(host: str) -> None:
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(
            f"--host {host!r}: not an http(s) URL; give the KFP API, e.g. http://ml-pipeline-ui.kubeflow:80"
        )


def _kfp_client(host: str, token: str | None, namespace: str | None):
    """A KFP client for --host, or a sentence saying why there is none (not a URL, not reachable)."""
    import kfp
    import urllib3

    check_host(host)
    try:
        return kfp.Client(host=host, existing_token=token, **({"namespace": namespace} if namespace else {}))
    except (urllib3.exceptions.HTTPError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise StepError(
            f"--host {host}: the KFP API cannot be reached ({type(reason).__name__}: {str(reason)[:200]}); check the "
            "URL and that the API answers (kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80)"
        ) from None


def submit_run(
    recipe: Recipe,
    host: str,
    *,
    experiment: str,
    run_name: str | None,
    params: list[str],
    registry: str = "",
    shm_size: str = "16Gi",
    cache_teacher: bool = False,
    work_pvc: str = "",
    client=None,
    namespace: str | None = None,
    token_file: str | None = None,
):
    """Compile for `recipe` and create a run on the KFP server at `host`; returns kfp's RunPipelineResult.

    Multi-user Kubeflow: `namespace` is the user's profile namespace (where the run, its experiment and
    its pods live); `token_file` holds a bearer token for the API (without it kfp.Client uses
    $KF_PIPELINES_SA_TOKEN_PATH or the pod's projected token when run inside the cluster)."""

    check_host(host)  # before compiling
    token = None
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise MissingInputError(f"--token-file {token_file}: no such file (a bearer token for the KFP API)")
        token = path.read_text(encoding="utf-8").strip()
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(
            recipe,
            Path(tmp) / "medcritical.yaml",
            registry=registry,
            shm_size=shm_size,
            cache_teacher=cache_teacher,
            work_pvc=work_pvc,
        )
        client = client or _kfp_client(host, token, namespace)
        return client.create_run_from_pipeline_package(
            str(package),
            arguments={"recipe": recipe_parameter(recipe), "run_root": recipe.run.root, **parse_params(params)},
            run_name=run_name or recipe.run.name,
            experiment_name=experiment,
            namespace=namespace,
        )
