"""What a Job, a TrainJob or a task of the compiled pipeline gives a step: GPUs, memory, /dev/shm, work volume."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from medcritical.errors import InputError
from medcritical.orchestration.report import REPORT
from medcritical.orchestration.runner import STAGES
from medcritical.platform.plan.units import quantity


@dataclass
class Given:
    """What one pod template (or pipeline task) offers a step."""

    where: str  # "Job/medcritical-sft" or "pipeline task sft"
    step: str
    overrides: list[str]
    recipe: str = ""  # a recipe of the image (the demo Job's) instead of the one checked; "" when mounted
    gpus: int = 0
    nodes: int = 1
    memory: int | None = None  # the memory limit (request when no limit)
    shm: int = 0
    work: int | None = None  # size of the volume holding the work folder; None: unknown (a claim)
    work_volume: str = ""
    ephemeral_request: int | None = None
    ephemeral_needed: bool = True  # the work folder is on the node's disk (emptyDir)
    memory_param: str = ""  # the pipeline parameter that sets the memory, if any
    gpu_param: str = ""  # the pipeline parameter that sets the GPU count, if any
    sized_by_plan: bool = False  # a TrainJob the pipeline sizes from this plan: only its GPUs are checked


# The steps the plan sizes, by command: every stage but the report (a few seconds of reading), and `run`.
STEP_COMMANDS = {stage.command for stage in STAGES.values() if stage is not REPORT} | {"run"}
DEFAULT_WORKDIR = "/home/medcritical/.cache/medcritical/work"  # ~/.cache/medcritical/work for the images' user


IMAGE_RECIPES = "/opt/medcritical/recipes/"  # the images copy recipes/ here


def _step_of(args: list[str]) -> tuple[str | None, list[str], str]:
    """(CLI step, --set overrides, the image's recipe it names if any) of a container's command line."""
    if "medcritical.cli" in args:
        args = args[args.index("medcritical.cli") + 1 :]
    positional = [a for a in args if not a.startswith("-")]
    step = positional[0] if positional else None
    if step == "stage" and len(positional) > 1:  # `medcritical stage sft ...`: the stage by its declared name
        step = positional[1].replace("_", "-")
    overrides = [args[k + 1] for k, a in enumerate(args[:-1]) if a == "--set"]
    recipe = next((args[k + 1] for k, a in enumerate(args[:-1]) if a == "--recipe"), "")
    own = recipe.removeprefix(IMAGE_RECIPES) if recipe.startswith(IMAGE_RECIPES) else ""
    return (step if step in STEP_COMMANDS else None), overrides, own


def _volume_size(volume: dict) -> tuple[int | None, bool]:
    """(size in bytes or None when unknown, on the node's disk)."""
    if "emptyDir" in volume:
        empty = volume["emptyDir"] or {}
        size = empty.get("sizeLimit")
        return (quantity(size) if size else None), empty.get("medium") != "Memory"
    if "ephemeral" in volume:
        claim = (volume["ephemeral"].get("volumeClaimTemplate") or {}).get("spec") or {}
        size = ((claim.get("resources") or {}).get("requests") or {}).get("storage")
        return (quantity(size) if size else None), False
    return None, False  # a PersistentVolumeClaim: its size is the claim's


def given_from_pod(where: str, pod: dict, nodes: int = 1) -> Given | None:
    containers = pod.get("containers") or []
    for container in containers:
        step, overrides, own_recipe = _step_of([*(container.get("command") or []), *(container.get("args") or [])])
        if step:
            break
    else:
        return None
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    memory = limits.get("memory") or requests.get("memory")
    given = Given(
        where,
        step,
        overrides,
        gpus=int(limits.get("nvidia.com/gpu", requests.get("nvidia.com/gpu", 0))),
        nodes=nodes,
        memory=quantity(memory) if memory else None,
        recipe=own_recipe,
    )
    if requests.get("ephemeral-storage"):
        given.ephemeral_request = quantity(requests["ephemeral-storage"])
    env = {e.get("name"): e.get("value") for e in container.get("env") or []}
    workdir = env.get("MEDCRITICAL_WORKDIR") or DEFAULT_WORKDIR
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    mounts = sorted(container.get("volumeMounts") or [], key=lambda m: -len(m.get("mountPath", "")))
    for mount in mounts:
        path = mount.get("mountPath", "")
        if mount.get("mountPath") == "/dev/shm":
            size, _ = _volume_size(volumes.get(mount.get("name"), {}))
            given.shm = size or 0
        if (workdir == path or workdir.startswith(path.rstrip("/") + "/")) and not given.work_volume:
            given.work_volume = mount.get("name")
            given.work, given.ephemeral_needed = _volume_size(volumes.get(mount.get("name"), {}))
    if not given.work_volume:
        given.work, given.ephemeral_needed = None, True  # the container's writable layer: ephemeral storage
    return given


def _manifest_documents(file: Path) -> list:
    try:
        return list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValueError) as e:  # ValueError: not UTF-8
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(
            f"--manifests {file}: not valid YAML{where} ({problem}); fix it, or pass --no-manifests"
        ) from None


def given_from_manifests(paths: list[Path]) -> list[Given]:
    """Every step pod in YAML files or folders (Jobs, PyTorchJobs, TrainJobs; kustomize output works too)."""
    files = []
    for path in paths:
        files += sorted(p for p in path.rglob("*.yaml") if p.name != "kustomization.yaml") if path.is_dir() else [path]
    found = []
    for file in files:
        for doc in _manifest_documents(file):
            if not isinstance(doc, dict):
                continue
            kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
            where = f"{kind}/{name} ({file})"
            spec = doc.get("spec") or {}
            if kind == "Job":
                given = given_from_pod(where, (spec.get("template") or {}).get("spec") or {})
            elif kind == "PyTorchJob":
                replicas = spec.get("pytorchReplicaSpecs") or {}
                nodes = sum(int((r or {}).get("replicas", 1)) for r in replicas.values())
                master = (replicas.get("Master") or {}).get("template", {}).get("spec") or {}
                given = given_from_pod(where, master, nodes)
            elif kind == "TrainJob":
                given = given_from_trainjob(where, doc)
            else:
                continue
            if given:
                found.append(given)
    return found


def node_pod_patches(spec: dict, job: str = "node") -> list[dict]:
    """The pod-spec patches a TrainJob's runtimePatches apply to the runtime's replicated `job`, in order
    (Trainer v2.2; what the plan and the manifest checks read volumes and security contexts from)."""
    found = []
    for patch in spec.get("runtimePatches") or []:
        runtime = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for replicated in runtime.get("replicatedJobs") or []:
            if replicated.get("name") == job:
                pod = (((replicated.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec")
                if pod:
                    found.append(pod)
    return found


def given_from_trainjob(where: str, doc: dict) -> Given | None:
    """A TrainJob: its trainer's command, resources per node and node count; volumes from its runtimePatches."""
    spec = doc.get("spec") or {}
    trainer = spec.get("trainer") or {}
    pod: dict = {
        "volumes": [],
        "containers": [
            {
                "command": trainer.get("command") or [],
                "args": trainer.get("args") or [],
                "resources": trainer.get("resourcesPerNode") or {},
                "env": trainer.get("env") or [],
                "volumeMounts": [],
            }
        ],
    }
    for patch in node_pod_patches(spec):
        pod["volumes"] += patch.get("volumes") or []
        for container in patch.get("containers") or []:
            if container.get("name") == "node":
                pod["containers"][0]["volumeMounts"] += container.get("volumeMounts") or []
    return given_from_pod(where, pod, int(trainer.get("numNodes", 1)))


# -- the compiled pipeline ----------------------------------------------------------------------------------


def pipeline_parameters(doc: dict) -> dict[str, dict]:
    """The compiled pipeline's parameters: name -> {"parameterType": ..., "defaultValue": ...}."""
    return (doc["root"].get("inputDefinitions") or {}).get("parameters", {})


def given_from_pipeline(path: Path, params: dict) -> list[Given]:
    """Each task of the compiled pipeline as a Given: GPUs (pipeline parameters), memory, volumes.

    `params` are the run's parameters (checked: pipeline_runner.check_params); the others keep their
    defaults. With train_nodes > 1 the sft and dpo tasks run as a TrainJob of train_nodes x node_gpus
    GPUs, sized by this plan when it is created (trainjob.py): only its GPUs are checked."""
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    pipeline, platform = docs[0], (docs[1] if len(docs) > 1 else {})
    defaults = {name: p.get("defaultValue") for name, p in pipeline_parameters(pipeline).items()}
    defaults.update(params)
    executors = pipeline["deploymentSpec"]["executors"]
    k8s = ((platform.get("platforms") or {}).get("kubernetes") or {}).get("deploymentSpec", {}).get("executors", {})
    nodes = int(defaults.get("train_nodes") or 1)
    found = []
    for task_name, task in pipeline["root"]["dag"]["tasks"].items():
        executor = pipeline["components"][task["componentRef"]["name"]]["executorLabel"]
        step = re.sub(r"-\d+$", "", task_name)  # KFP numbers a component's later tasks: evaluate-2, rollout-3
        if step not in STEP_COMMANDS:
            continue
        if step in ("sft", "dpo") and nodes > 1:
            gpus = int(defaults.get("node_gpus") or 0)
            found.append(
                Given(
                    f"pipeline task {task_name} as a TrainJob of {nodes} x {gpus} GPUs ({path})",
                    step,
                    [],
                    gpus=gpus,
                    nodes=nodes,
                    gpu_param="node_gpus",
                    sized_by_plan=True,
                )
            )
            continue
        resources = executors[executor]["container"].get("resources") or {}
        given = Given(f"pipeline task {task_name} ({path})", step, [])
        accelerator = resources.get("accelerator") or {}
        count = accelerator.get("resourceCount") or accelerator.get("count")
        if count is not None:
            given.gpus = int(_param_value(count, task, defaults))
            given.gpu_param = _param_name(count)
        memory = resources.get("resourceMemoryLimit")
        if memory:
            given.memory = quantity(_param_value(memory, task, defaults))
            given.memory_param = _param_name(memory)
        settings = k8s.get(executor) or {}
        env = {e["name"]: e.get("value") for e in executors[executor]["container"].get("env") or []}
        workdir = env.get("MEDCRITICAL_WORKDIR")
        given.work, given.ephemeral_needed = None, True  # the container's writable layer
        for mount in settings.get("emptyDirMounts") or []:
            if mount.get("mountPath") == "/dev/shm":
                given.shm = quantity(mount.get("sizeLimit", 0))
            elif workdir and mount.get("mountPath") == workdir:
                # A size-limited emptyDir: the kubelet evicts past the limit. KFP cannot request
                # ephemeral-storage for a task, so the node's free disk is not checked (docs/sizing.md).
                size = mount.get("sizeLimit")
                given.work, given.work_volume = (quantity(size) if size else None), mount["volumeName"]
                given.ephemeral_needed = False
        for volume in settings.get("genericEphemeralVolume") or []:
            if workdir and volume.get("mountPath") == workdir:
                given.work, given.work_volume, given.ephemeral_needed = (
                    quantity(volume["size"]),
                    volume["volumeName"],
                    False,
                )
        for volume in settings.get("pvcMount") or []:
            if workdir and volume.get("mountPath") == workdir:
                given.work, given.work_volume, given.ephemeral_needed = None, "PVC", False
        found.append(given)
    return found


def _param_name(value) -> str:
    match = re.search(r"pipelinechannel--([A-Za-z0-9_]+)", str(value))
    return match.group(1) if match else ""


def _param_value(value, task: dict, defaults: dict):
    """A task input bound to a pipeline parameter (`{{$.inputs.parameters['pipelinechannel--train_gpus']}}`)."""
    name = _param_name(value)
    return defaults.get(name, 0) if name else value
