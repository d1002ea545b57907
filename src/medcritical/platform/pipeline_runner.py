"""The pipeline for a cluster: compiled (with the cluster settings checked) or submitted to a KFP server.

Running it on this machine is `medcritical.platform.local_run`."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from medcritical.core.values import assignment
from medcritical.errors import InputError, StepError, UserError
from medcritical.orchestration.recipe import Recipe, load_recipe_text
from medcritical.pipelines.medcritical_pipeline import IMAGE_REPOSITORIES, ClusterSettings, build_pipeline, image_names
from medcritical.platform import plan
from medcritical.platform.kfp_runtime import resolve_recipe_text
from medcritical.platform.plan import PlanError, pipeline_parameters, quantity
from medcritical.platform.scheduling import SchedulingError, check_gpu_product, check_priority, check_queue

log = logging.getLogger(__name__)


def recipe_parameter(recipe: Recipe) -> str:
    """The recipe as the pipeline's `recipe` parameter: one-line JSON (valid YAML), because KFP writes
    parameter defaults into a comment header that a multi-line value would break."""
    return json.dumps(recipe.model_dump(mode="json"), ensure_ascii=False)


def pipeline_for(recipe: Recipe, cluster=None, cache_teacher: bool = False):
    """The pipeline function for `recipe`, as KFP's compiler and its local runner (local_run) take it."""
    return build_pipeline(recipe_parameter(recipe), recipe.run.root, recipe.selfplay.rounds, cluster, cache_teacher)


class PreflightError(UserError, ValueError):
    """A pipeline parameter or cluster setting Kubernetes or KFP would refuse, or a run the plan says
    will not fit."""


# Kubernetes object names (Secrets, claims): RFC 1123 DNS subdomains.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# An extended resource name such as nvidia.com/gpu: a DNS subdomain prefix and a name.
_RESOURCE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# An image reference as the container runtimes parse it (distribution/reference): an optional registry
# host[:port], lower-case path components, a tag.
_IMAGE = re.compile(
    r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r":[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(?:@sha256:[0-9a-f]{64})?$"
)
_DIGEST = re.compile(r"(?:^|@)(sha256:[0-9a-f]{64})$")


def check_object_name(value: str, what: str) -> None:
    if not (0 < len(value) <= 253 and _DNS_SUBDOMAIN.match(value)):
        raise PreflightError(
            f"{what} {value!r} is not a Kubernetes object name: lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters"
        )


def load_image_digests(path: str | Path | None) -> dict[str, str]:
    """--image-digests: what the image build pushed, one digest per image, as a JSON (or YAML) mapping of
    repository name to digest:

        {"medcritical-cpu": "sha256:<64 hex>", "medcritical-train-cuda": "sha256:...",
         "medcritical-infer-cuda": "sha256:..."}

    A value may also be a whole pushed reference (`docker inspect --format '{{index .RepoDigests 0}}'`,
    `registry.example.com/ml/medcritical-cpu@sha256:...`): its digest is used. Every image the pipeline runs
    must be named, so that no task runs a moving tag beside pinned ones."""
    if not path:
        return {}
    file = Path(path)
    try:
        mapping = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise PreflightError(f"--image-digests {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError:
        raise PreflightError(f"--image-digests {path}: not valid JSON or YAML") from None
    example = '{"medcritical-cpu": "sha256:<64 hex digits>", ...}'
    if not isinstance(mapping, dict):
        raise PreflightError(f"--image-digests {path}: a mapping of image name to digest, e.g. {example}")
    names = set(IMAGE_REPOSITORIES.values())
    if unknown := sorted(set(map(str, mapping)) - names):
        raise PreflightError(
            f"--image-digests {path}: {', '.join(unknown)}: not an image of the pipeline ({', '.join(sorted(names))})"
        )
    if missing := sorted(names - set(mapping)):
        raise PreflightError(
            f"--image-digests {path}: no digest for {', '.join(missing)}; every image the pipeline runs is "
            "pinned, or none"
        )
    digests = {}
    for name, value in mapping.items():
        match = _DIGEST.search(str(value).strip())
        if not match:
            raise PreflightError(
                f"--image-digests {path}: {name}: {value!r} is not a digest; sha256: and 64 lower-case hex digits"
            )
        digests[name] = match.group(1)
    return digests


def check_cluster_settings(registry: str, shm_size: str, work_pvc: str, digests: dict | None = None) -> None:
    """--registry, --shm-size and --work-pvc as Kubernetes and the container runtime would take them."""
    if registry and not registry.endswith("/"):
        raise PreflightError(f"--registry {registry!r}: a prefix ending in '/', e.g. registry.example.com/ml/")
    for image in image_names(registry, digests=digests).values():
        if not _IMAGE.match(image):
            raise PreflightError(
                f"--registry {registry!r} gives the image name {image!r}, which no container runtime accepts: "
                "a registry host (optionally :port) and lower-case path parts, e.g. registry.example.com/ml/"
            )
    try:
        if quantity(shm_size) <= 0:
            raise PlanError("zero")
    except PlanError:
        raise PreflightError(f"--shm-size {shm_size!r}: a Kubernetes quantity above 0, e.g. 16Gi") from None
    if work_pvc:
        check_object_name(work_pvc, "--work-pvc")


def _count(name: str, value, minimum: int) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < minimum:
        raise PreflightError(
            f"--param {name}={value!r}: a whole number of at least {minimum}, e.g. {name}={minimum + 1}"
        )
    return int(text)


def check_params(pipeline_doc: dict, params: dict) -> dict:
    """The run's parameters checked against the compiled pipeline: known names, the declared types (GPU
    counts as the strings the pipeline declares), values Kubernetes and KFP accept. Returns them as the
    API server must receive them."""
    declared = pipeline_parameters(pipeline_doc)
    checked = {}
    for name, value in params.items():
        if name not in declared:
            raise PreflightError(
                f"--param {name}: the pipeline has no such parameter; it has {', '.join(sorted(declared))}"
            )
        kind = declared[name]["parameterType"]
        if name in ("train_gpus", "infer_gpus"):
            value = str(_count(name, value, 0))
        elif name in ("train_nodes", "node_gpus"):
            value = _count(name, value, 1)
        elif name in ("train_memory", "infer_memory"):
            try:
                if quantity(value) < 1024**3:
                    raise PlanError("too small")
            except PlanError:
                raise PreflightError(
                    f"--param {name}={value!r}: a Kubernetes memory quantity of at least 1Gi, e.g. {name}=160Gi"
                ) from None
            value = str(value)
        elif name in ("s3_secret", "teacher_secret", "judge_secret"):
            check_object_name(str(value), f"--param {name}")
        elif name in ("gpu_product", "kueue_queue", "kueue_priority"):
            check = {"gpu_product": check_gpu_product, "kueue_queue": check_queue, "kueue_priority": check_priority}
            try:
                value = check[name](value, f"--param {name}")
            except SchedulingError as e:
                raise PreflightError(str(e)) from None
        elif name == "accelerator_type" and not _RESOURCE_NAME.match(str(value)):
            raise PreflightError(
                f"--param accelerator_type={value!r}: an extended resource name such as nvidia.com/gpu"
            )
        elif name in ("run_root", "distill_uri") and (value or name == "run_root"):
            if not (isinstance(value, str) and re.match(r"^s3://[a-z0-9][a-z0-9.-]{0,62}(/|$)", value)):
                raise PreflightError(
                    f"--param {name}={value!r}: an s3://bucket/prefix URI (every task of a cluster run reads and "
                    "writes there; a local path would stay inside one pod)"
                )
        elif kind == "STRING" and not isinstance(value, str):
            value = str(value)
        elif kind == "NUMBER_INTEGER" and (isinstance(value, bool) or not isinstance(value, int)):
            raise PreflightError(f"--param {name}={value!r}: a whole number")
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            raise PreflightError(f"--param {name}={value!r}: true or false")
        elif kind == "LIST" and not isinstance(value, list):
            raise PreflightError(f"--param {name}={value!r}: a YAML list, e.g. {name}='[...]'")
        elif kind == "STRUCT" and not isinstance(value, dict):
            raise PreflightError(f"--param {name}={value!r}: a YAML mapping, e.g. {name}='{{key: value}}'")
        if name == "tolerations" and not all(isinstance(t, dict) for t in value):
            raise PreflightError(
                f"--param tolerations={value!r}: a list of tolerations, e.g. '[{{key: k, operator: Exists}}]'"
            )
        if name == "node_selector" and not all(isinstance(v, str) for v in value.values()):
            raise PreflightError(f"--param node_selector={value!r}: label values are strings; quote numbers")
        checked[name] = value
    return checked


def preflight(
    recipe: Recipe,
    package: Path,
    params: dict,
    *,
    gpu_memory: str = "80Gi",
    model_config: str | None = None,
    teacher_config: str | None = None,
) -> None:
    """The plan's checks on the compiled pipeline `package` with the run's (checked) `params`: raise
    PreflightError naming each task, resource, need and fix when something will not fit."""
    doc = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))
    run_recipe = recipe
    if "recipe" in params or "overrides" in params or "base_model" in params:
        defaults = {name: p.get("defaultValue") for name, p in plan.pipeline_parameters(doc).items()}
        defaults.update(params)
        run_recipe = load_recipe_text(
            resolve_recipe_text(
                defaults["recipe"],
                recipe.selfplay.rounds,
                defaults.get("overrides") or [],
                defaults.get("base_model") or "",
                defaults.get("teacher_base_url") or "",
                defaults.get("teacher_model") or "",
            )
        )
    verdicts = plan.check_manifests(
        run_recipe,
        plan.given_from_pipeline(package, params),
        gpu_memory=plan.quantity(gpu_memory),
        model_config=model_config,
        teacher_config=teacher_config,
    )
    problems = [p for v in verdicts for p in v.problems]
    if problems:
        raise PreflightError(
            "this run does not fit its recipe (`medcritical plan --recipe ...` shows every step's needs):\n  "
            + "\n  ".join(str(p) for p in problems)
        )


def compile_pipeline(
    recipe: Recipe,
    output: str | Path,
    *,
    registry: str = "",
    image_digests: str | Path | None = None,
    shm_size: str = "16Gi",
    cache_teacher: bool = False,
    work_pvc: str = "",
    kueue_queue: str = "",
    kueue_priority: str = "",
    model_config: str | None = None,
    teacher_config: str | None = None,
    gpu_memory: str = "80Gi",
    check: bool = True,
) -> Path:
    """Compile the cluster pipeline (images from `registry`, pinned by the digests in the file `image_digests`
    when given) with `recipe` as its default recipe; the settings are checked first and, with `check`, the
    plan's checks run on the result (PreflightError)."""
    from kfp import compiler

    digests = load_image_digests(image_digests)
    check_cluster_settings(registry, shm_size, work_pvc, digests)
    try:
        kueue_queue = check_queue(kueue_queue, "--kueue-queue")
        kueue_priority = check_priority(kueue_priority, "--kueue-priority")
    except SchedulingError as e:
        raise PreflightError(str(e)) from None
    cluster = ClusterSettings(
        shm_size=shm_size,
        images=image_names(registry, digests=digests),
        work_pvc=work_pvc,
        model_config=model_config,
        teacher_config=teacher_config,
        kueue_queue=kueue_queue,
        kueue_priority=kueue_priority,
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Written in place only once checked: a refused pipeline leaves no file behind.
        compiled = Path(tmp) / output.name
        compiler.Compiler().compile(pipeline_for(recipe, cluster, cache_teacher), str(compiled))
        if check:
            preflight(
                recipe,
                compiled,
                {},
                gpu_memory=gpu_memory,
                model_config=model_config,
                teacher_config=teacher_config,
            )
        shutil.copyfile(compiled, output)
    return output


def parse_params(params: list[str]) -> dict:
    parsed = {}
    for param in params:
        name, value = assignment(
            param, option="--param", form="NAME=VALUE", example="train_gpus=8", error=PreflightError
        )
        try:
            parsed[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise PreflightError(f"--param {param!r}: the value is not valid YAML; quote it") from None
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
    image_digests: str | Path | None = None,
    shm_size: str = "16Gi",
    cache_teacher: bool = False,
    work_pvc: str = "",
    kueue_queue: str = "",
    kueue_priority: str = "",
    client=None,
    namespace: str | None = None,
    token_file: str | None = None,
    model_config: str | None = None,
    teacher_config: str | None = None,
    gpu_memory: str = "80Gi",
):
    """Compile for `recipe`, run the plan's checks with the run's parameters (PreflightError, nothing
    submitted, when the run will not fit), and create a run on the KFP server at `host`; returns kfp's
    RunPipelineResult.

    Multi-user Kubeflow: `namespace` is the user's profile namespace (where the run, its experiment and
    its pods live); `token_file` holds a bearer token for the API (without it kfp.Client uses
    $KF_PIPELINES_SA_TOKEN_PATH or the pod's projected token when run inside the cluster)."""

    check_host(host)  # before compiling
    token = None
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise PreflightError(f"--token-file {token_file}: no such file (a bearer token for the KFP API)")
        token = path.read_text(encoding="utf-8").strip()
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(
            recipe,
            Path(tmp) / "medcritical.yaml",
            registry=registry,
            image_digests=image_digests,
            shm_size=shm_size,
            cache_teacher=cache_teacher,
            work_pvc=work_pvc,
            kueue_queue=kueue_queue,
            kueue_priority=kueue_priority,
            check=False,
        )
        doc = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))
        arguments = check_params(
            doc, {"recipe": recipe_parameter(recipe), "run_root": recipe.run.root, **parse_params(params)}
        )
        preflight(
            recipe,
            package,
            arguments,
            gpu_memory=gpu_memory,
            model_config=model_config,
            teacher_config=teacher_config,
        )
        client = client or _kfp_client(host, token, namespace)
        return client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=run_name or recipe.run.name,
            experiment_name=experiment,
            namespace=namespace,
        )
