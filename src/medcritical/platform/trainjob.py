"""A training step on several nodes from inside the pipeline: a Kubeflow Trainer v2 TrainJob, created and
awaited by the step's own KFP task.

KFP runs one pod per task; SFT or DPO on several nodes needs several pods that rendezvous. With the
pipeline parameter `train_nodes` above 1, the sft and dpo tasks build a TrainJob like
k8s/jobs/sft-multinode (the `torch-distributed` runtime, torchrun reading the PET_* variables, the
recipe's DeepSpeed config), sized by `medcritical plan`, create it in their own namespace, wait for it
and return its output URI; rank 0 of the TrainJob publishes the step's folder to S3 as usual.
The task's ServiceAccount must be allowed to create, read and delete TrainJobs (k8s/overlays/pipeline-rbac).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from medcritical.errors import StepError
from medcritical.orchestration.recipe import dump_recipe, load_recipe_text
from medcritical.orchestration.runner import STAGES, keep_global_batch, stage_command
from medcritical.orchestration.staging import folder_file, join_uri
from medcritical.platform.kfp_runtime import log_metrics, run_component_step, task_recipe
from medcritical.platform.plan import GiB, gib, plan_steps, quantity
from medcritical.platform.scheduling import GPU_PRODUCT_LABEL, check_gpu_product, queue_labels

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
RECIPE_FILE = "/tmp/recipe.yaml"


# The owner of MedCritical's runtime patch (Trainer keys patches by manager: a domain-prefixed path).
PATCH_MANAGER = "medcritical.local/trainjob"


class TrainJobError(StepError):
    pass


def runtime_patch(pod_spec: dict, job: str = "node") -> dict:
    """A TrainJob runtimePatches entry (Trainer v2.2) that patches the pod spec of the runtime's `job`."""
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {"replicatedJobs": [{"name": job, "template": {"spec": {"template": {"spec": pod_spec}}}}]}
            }
        },
    }


def trainjob_name(step: str, output_uri: str) -> str:
    """One name per step output (a retried task finds its TrainJob again instead of starting another)."""
    return f"medcritical-{step}-{hashlib.sha256(output_uri.encode()).hexdigest()[:10]}"


def _node_resources(gpus_per_node: int, memory: str, ephemeral: str, gpu_product: str) -> tuple[dict, dict, dict]:
    """A node's (requests, limits, placement): its GPUs and GPU product, or a CPU node's modest share."""
    requests = {"cpu": str(8 * gpus_per_node), "memory": memory, "ephemeral-storage": ephemeral}
    product = check_gpu_product(gpu_product)
    placement = {}
    if gpus_per_node:
        requests["nvidia.com/gpu"] = str(gpus_per_node)
        limits = dict(requests)
        if product:  # CPU nodes (gpus_per_node=0) carry no GPU product
            placement["nodeSelector"] = {GPU_PRODUCT_LABEL: product}
    else:
        # A CPU node's process uses the cores the node has free; the request only has to fit beside others.
        requests["cpu"] = "500m"
        limits = {**requests, "cpu": "2"}
    return requests, limits, placement


def _node_pod(work: str, shm_size: str, placement: dict) -> dict:
    """The pod fields patched onto the runtime's `node` job: no API token, non-root, read-only root, scratch volumes."""
    return {
        "serviceAccountName": "medcritical",  # no API token (k8s/overlays/pipeline-rbac)
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        **placement,
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": work}},
            {"name": "home", "emptyDir": {"sizeLimit": "20Gi"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        ],
        "containers": [
            {
                "name": "node",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "home", "mountPath": "/home/medcritical"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
    }


def trainjob_manifest(
    step: str,
    recipe_yaml: str,
    output_uri: str,
    inputs: dict,
    *,
    image: str,
    nodes: int,
    gpus_per_node: int,
    s3_secret: str,
    shm_size: str | None = None,
    deadline_s: int = 72 * 3600,
    gpu_product: str = "",
    kueue_queue: str = "",
    kueue_priority: str = "",
) -> dict:
    """The TrainJob that runs `medcritical stage <name>` (runner.stage_command) on `nodes` x `gpus_per_node`
    GPUs, sized by the plan.
    `gpus_per_node=0` (the pipeline's train_gpus=0): CPU nodes, one training process on each.
    `gpu_product`: its GPU nodes' `nvidia.com/gpu.product` (a nodeSelector); `kueue_queue`: the Kueue
    LocalQueue that admits it (the `kueue.x-k8s.io/queue-name` label), `kueue_priority` its Kueue
    WorkloadPriorityClass (Trainer v2.2's runtimePatches cannot set a pod's priorityClassName). "": not set."""
    if shm_size is None:  # NCCL's shared-memory transport between 8 local ranks; gloo on CPU needs little
        shm_size = "64Gi" if gpus_per_node else "1Gi"

    recipe = load_recipe_text(recipe_yaml, checked=True)  # the pipeline's configured recipe
    # Each rank refuses a global batch its accumulation cannot keep; refused here, the task fails at once naming
    # the key, instead of every pod of the TrainJob failing its retries with that message.
    keep_global_batch(STAGES[step], recipe, nodes * (gpus_per_node or 1))
    need = plan_steps(recipe, train_gpus=gpus_per_node, nodes=nodes)[step]
    memory = gib(need.host_memory + quantity(shm_size))
    work = gib(need.disk)
    ephemeral = gib(need.disk + 20 * GiB)  # the work folder, the caches and /tmp
    cli = stage_command(STAGES[step], RECIPE_FILE, output_uri, inputs)
    # The recipe travels in the environment (it is the pipeline's resolved recipe, a few KB) and is written
    # to a file first; then torchrun, which takes its rendezvous from the PET_* variables of the runtime.
    script = f'printf "%s" "$MEDCRITICAL_RECIPE_YAML" > {RECIPE_FILE} && exec torchrun "$@"'
    secret_env = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key}}}
        for key in ("MEDCRITICAL_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]
    requests, limits, placement = _node_resources(gpus_per_node, memory, ephemeral, gpu_product)
    labels = {"app.kubernetes.io/part-of": "medcritical", "app.kubernetes.io/component": step}
    labels.update(queue_labels(kueue_queue, kueue_priority))
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": trainjob_name(step, output_uri),
            "labels": labels,
        },
        "spec": {
            "runtimeRef": {"name": RUNTIME},
            "activeDeadlineSeconds": deadline_s,
            "trainer": {
                "image": image,
                "numNodes": nodes,
                "numProcPerNode": gpus_per_node or 1,
                "command": ["sh", "-c", script, "sh"],
                "args": cli,
                "env": [
                    {"name": "MEDCRITICAL_RECIPE_YAML", "value": recipe_yaml},
                    {"name": "MEDCRITICAL_WORKDIR", "value": "/tmp/medcritical-work"},
                    {"name": "NCCL_DEBUG", "value": "WARN"},
                    *secret_env,
                ],
                "resourcesPerNode": {"requests": requests, "limits": limits},
            },
            # Trainer v2.2 patches the runtime's pods through runtimePatches (podTemplateOverrides is gone):
            # the `node` job of torch-distributed, its `node` container (env only through `trainer`).
            "runtimePatches": [runtime_patch(_node_pod(work, shm_size, placement))],
        },
    }


def _condition(job: dict, kind: str) -> dict | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def run_trainjob(
    manifest: dict, namespace: str, *, api=None, poll_s: float = 30.0, timeout_s: float | None = None, sleep=time.sleep
) -> dict:
    """Create the TrainJob and wait until it completes; raise TrainJobError naming it when it fails.

    A retried task finds the TrainJob its earlier attempt created (same name): one still running is awaited, one
    that failed is deleted and created again (its pods resume from the checkpoints the step mirrors to S3), so a
    retry is a new try, not the old failure read again. A completed TrainJob is deleted once its output is in
    S3: finished JobSets, pods and their logs otherwise pile up with every run. Returns its last state."""
    from kubernetes.client.exceptions import ApiException

    if api is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.CustomObjectsApi()
    name = manifest["metadata"]["name"]
    where = f"TrainJob {namespace}/{name}"
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        log.info("created %s (%s nodes)", where, manifest["spec"]["trainer"]["numNodes"])
    except ApiException as e:
        if e.status == 409:
            earlier = _condition(api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name), "Failed")
            if earlier:
                log.warning(
                    "%s of an earlier attempt failed (%s): deleting it and starting again", where, _why(earlier)
                )
                _delete_and_wait(api, namespace, name, poll_s, sleep)
                api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
                log.info("created %s again", where)
            else:
                log.info("%s exists (a retried task): waiting for it", where)
        elif e.status == 404:
            raise TrainJobError(
                f"{where}: the API has no TrainJob kind; install Kubeflow Trainer v2.2 "
                "(k8s/local/cluster.sh trainer sets it up locally) or run with train_nodes=1"
            ) from e
        elif e.status == 403:
            raise TrainJobError(
                f"{where}: this task's ServiceAccount may not create TrainJobs; apply "
                "k8s/overlays/pipeline-rbac in this namespace"
            ) from e
        else:
            raise
    started = time.monotonic()
    while True:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if _condition(job, "Complete"):
            log.info("%s completed", where)
            _delete_finished(api, namespace, name)
            return job
        failed = _condition(job, "Failed")
        if failed:
            raise TrainJobError(
                f"{where} failed: {_why(failed)}"
                + f"; its pods' logs: kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name}"
            )
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TrainJobError(f"{where}: not complete after {timeout_s:.0f} s")
        sleep(poll_s)


def _why(condition: dict) -> str:
    return f"{condition.get('reason', '')} {condition.get('message', '')}".strip()


def _delete_and_wait(api, namespace: str, name: str, poll_s: float, sleep, attempts: int = 60) -> None:
    """Delete a TrainJob with its JobSet and pods, and wait until its name is free to create again."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body={"propagationPolicy": "Foreground"}
        )
    except ApiException as e:
        if e.status == 403:
            raise TrainJobError(
                f"TrainJob {namespace}/{name}: an earlier attempt failed and this task's ServiceAccount may not "
                "delete it to try again; apply k8s/overlays/pipeline-rbac in this namespace (it grants delete), "
                f"or delete it yourself: kubectl -n {namespace} delete trainjob {name}"
            ) from e
        if e.status != 404:
            raise
    for _ in range(attempts):
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        sleep(min(poll_s, 5.0))
    raise TrainJobError(f"TrainJob {namespace}/{name}: still there after deleting it; look at its finalizers")


def _delete_finished(api, namespace: str, name: str) -> None:
    """Clean up a completed TrainJob; a cluster that refuses (older RBAC) keeps it, and the step still succeeds."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body={"propagationPolicy": "Background"}
        )
    except ApiException as e:
        if e.status not in (403, 404):
            raise
        log.warning(
            "TrainJob %s/%s completed and is kept: %s (k8s/overlays/pipeline-rbac grants delete)",
            namespace,
            name,
            "not allowed to delete it" if e.status == 403 else "already gone",
        )


def own_namespace() -> str:
    if not SA_NAMESPACE.is_file():
        raise TrainJobError(f"{SA_NAMESPACE}: not inside a Kubernetes pod; train_nodes > 1 needs the cluster")
    return SA_NAMESPACE.read_text(encoding="utf-8").strip()


def run_component_on_nodes(
    step: str,
    recipe_yaml: str,
    run_root: str,
    name: str,
    metrics,
    *,
    nodes: int,
    gpus_per_node: int,
    image: str,
    s3_secret: str,
    api=None,
    namespace: str = "",
    gpu_product: str = "",
    kueue_queue: str = "",
    kueue_priority: str = "",
    **inputs,
) -> str:
    """What the sft / dpo component does when train_nodes > 1: the step as a TrainJob; its metrics logged."""
    recipe_yaml = dump_recipe(task_recipe(recipe_yaml, run_root))
    output_uri = join_uri(run_root, name)
    manifest = trainjob_manifest(
        step,
        recipe_yaml,
        output_uri,
        inputs,
        image=image,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        s3_secret=s3_secret,
        gpu_product=gpu_product,
        kueue_queue=kueue_queue,
        kueue_priority=kueue_priority,
    )
    run_trainjob(manifest, namespace or own_namespace(), api=api)
    log_metrics(metrics, json.loads(folder_file(output_uri, STAGES[step].stats).read_text(encoding="utf-8")))
    return output_uri


def run_training_step(
    step: str,
    recipe: str,
    run_root: str,
    name: str,
    metrics,
    *,
    nodes: int,
    gpus_per_node: int,
    image: str,
    s3_secret: str,
    gpu_product: str = "",
    kueue_queue: str = "",
    kueue_priority: str = "",
    **inputs,
) -> str:
    """A training component's work (sft, dpo): on this pod's GPUs, or as a TrainJob of `nodes` nodes."""
    if nodes > 1:
        return run_component_on_nodes(
            step,
            recipe,
            run_root,
            name,
            metrics,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            image=image,
            s3_secret=s3_secret,
            gpu_product=gpu_product,
            kueue_queue=kueue_queue,
            kueue_priority=kueue_priority,
            **inputs,
        )

    return run_component_step(step, recipe, run_root, name, metrics, **inputs)
