"""MedCritical's rules for Kubernetes manifests: what the API schemas accept but we do not.

`check(objects)` takes the objects of one `kubectl kustomize` build (dicts) and returns every
violation, each naming the object and the field, e.g.

    Job/medcritical-sft: spec.template.spec.containers[step].resources.limits.nvidia.com/gpu:
    GPU limit must equal the request (request '1', limit '2')

Rules (why each exists):
- names are DNS labels (they become pod names, DNS names and label values);
- a Job's pods restart Never or OnFailure (Always is invalid for Jobs; the API says so only at
  apply time), a Job sets backoffLimit and ttlSecondsAfterFinished (finished Jobs do not pile up),
  and a podFailurePolicy needs restartPolicy Never;
- a PyTorchJob replica never restarts Always, names its container `pytorch` (the operator looks
  for it) and sets runPolicy.backoffLimit, ttlSecondsAfterFinished and activeDeadlineSeconds; Jobs
  set activeDeadlineSeconds too (a hung NCCL or vLLM process would hold its GPUs forever);
- a TrainJob (Kubeflow Trainer v2) names its runtime, sets activeDeadlineSeconds, and its pod is
  checked as the runtime builds it: the trainer's image, command, env and resources in the `node`
  container, with the volumes, mounts and security contexts of its runtimePatches (Trainer v2.2);
- images carry a tag or digest, never `latest` (an unpinned image is a different program tomorrow);
- containers request CPU and memory and limit memory; GPU limits equal GPU requests;
- pods run as non-root, containers without privilege escalation, privileged mode or capabilities,
  on a read-only root filesystem (unless the workload's annotation
  `medcritical.io/writable-root-filesystem` says why not) with /tmp writable; pods that use GPUs
  mount a memory-backed /dev/shm (NCCL and vLLM need more than the 64 MB default);
- a pod that mounts a PersistentVolumeClaim sets fsGroup (a root-owned volume is not writable by
  the images' UID 10001);
- pods mount no ServiceAccount token (no step talks to the Kubernetes API): the pod says so, or its
  ServiceAccount does (a TrainJob's pod cannot: k8s/base's ServiceAccount has no token);
- every Secret a pod names exists in the build or is documented (`external_secrets`); every
  ConfigMap, PersistentVolumeClaim and ServiceAccount exists in the build or in `provided`
  (objects of another kustomization, e.g. k8s/base); every volumeMount names a volume.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from medcritical.platform.plan import node_pod_patches

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915", "gpu.intel.com/xe")
WRITABLE_ROOT_ANNOTATION = "medcritical.io/writable-root-filesystem"

# Kinds whose names become DNS names or label values (63 characters at most); Services and
# PyTorchJobs must also start with a letter (DNS-1035).
LABEL_NAMED = {"Namespace", "Job", "CronJob", "Deployment", "StatefulSet", "DaemonSet", "Pod"}
DNS_1035_NAMED = {"Service", "PyTorchJob", "TrainJob"}
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}


@dataclass(frozen=True)
class Violation:
    obj: str  # Kind/name
    field: str  # dotted path into the object; list items by their name where they have one
    message: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.field}: {self.message}"


@dataclass(frozen=True)
class PodTemplate:
    """A pod spec inside a workload, with the path that leads to it."""

    owner: dict
    path: str  # e.g. spec.template.spec
    spec: dict


def object_id(obj: dict) -> str:
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def pod_templates(obj: dict) -> Iterator[PodTemplate]:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        yield PodTemplate(obj, "spec", spec)
    elif kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        yield PodTemplate(obj, "spec.template.spec", (spec.get("template") or {}).get("spec") or {})
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
        yield PodTemplate(obj, "spec.jobTemplate.spec.template.spec", template.get("spec") or {})
    elif kind == "PyTorchJob":
        for replica, replica_spec in (spec.get("pytorchReplicaSpecs") or {}).items():
            template = (replica_spec or {}).get("template") or {}
            yield PodTemplate(obj, f"spec.pytorchReplicaSpecs.{replica}.template.spec", template.get("spec") or {})
    elif kind == "TrainJob":
        yield PodTemplate(obj, "spec.runtimePatches[node].spec", trainjob_pod(spec))


TRAINER_CONTAINER = "node"  # the torch-distributed runtime's training job and container


def trainjob_pod(spec: dict) -> dict:
    """The pod spec of a TrainJob's `node` job as the runtime builds it from the trainer and the patches
    (the runtime's own template adds only its defaults; Kubeflow Trainer v2.2)."""
    trainer = spec.get("trainer") or {}
    container = {"name": TRAINER_CONTAINER}
    for key in ("image", "command", "args", "env"):
        if key in trainer:
            container[key] = trainer[key]
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    pod: dict = {"containers": [container]}
    for patch in node_pod_patches(spec, TRAINER_CONTAINER):
        for key, value in patch.items():
            if key != "containers":
                pod[key] = value
        for change in patch.get("containers") or []:
            if change.get("name") == TRAINER_CONTAINER:
                container.update({k: v for k, v in change.items() if k != "name"})
    return pod


def _containers(pod: PodTemplate) -> Iterator[tuple[str, dict]]:
    for key in ("initContainers", "containers"):
        for container in pod.spec.get(key) or []:
            yield f"{pod.path}.{key}[{container.get('name', '?')}]", container


def check(
    objects: Iterable[dict], *, external_secrets: Iterable[str] = (), provided: Iterable[dict] = ()
) -> list[Violation]:
    """Every rule violation in one build's objects (see the module docstring for the rules)."""
    objects = list(objects)
    available: dict[str, set[str]] = {}
    for obj in [*objects, *provided]:
        available.setdefault(obj.get("kind", ""), set()).add(obj.get("metadata", {}).get("name", ""))
    available.setdefault("Secret", set()).update(external_secrets)
    available["ServiceAccountWithoutToken"] = {
        obj["metadata"]["name"]
        for obj in [*objects, *provided]
        if obj.get("kind") == "ServiceAccount" and obj.get("automountServiceAccountToken") is False
    }

    found: list[Violation] = []
    for obj in objects:
        found += _check_metadata(obj)
        if obj.get("kind") == "Job":
            found += _check_job(obj)
        if obj.get("kind") == "PyTorchJob":
            found += _check_pytorchjob(obj)
        if obj.get("kind") == "TrainJob":
            found += _check_trainjob(obj)
        for pod in pod_templates(obj):
            found += _check_pod(pod, available)
    return found


def _check_metadata(obj: dict) -> list[Violation]:
    found = []
    oid, kind = object_id(obj), obj.get("kind", "")
    name = obj.get("metadata", {}).get("name") or ""
    if kind in DNS_1035_NAMED:
        pattern, what = DNS_1035_LABEL, "a DNS-1035 label (lower-case letters, digits, '-'; starts with a letter)"
    elif kind in LABEL_NAMED:
        pattern, what = DNS_LABEL, "a DNS-1123 label (lower-case letters, digits, '-')"
    else:
        pattern, what = DNS_SUBDOMAIN, "a DNS-1123 subdomain (lower-case letters, digits, '-', '.')"
    limit = 253 if pattern is DNS_SUBDOMAIN else 63
    if not pattern.match(name) or len(name) > limit:
        found.append(Violation(oid, "metadata.name", f"{name!r} is not {what} of at most {limit} characters"))
    if kind not in CLUSTER_SCOPED and not obj.get("metadata", {}).get("namespace"):
        found.append(Violation(oid, "metadata.namespace", "missing: set `namespace:` in the kustomization"))
    return found


def _check_job(job: dict) -> list[Violation]:
    oid, spec = object_id(job), job.get("spec") or {}
    found = []
    pod = (spec.get("template") or {}).get("spec") or {}
    policy = pod.get("restartPolicy")
    if policy not in ("Never", "OnFailure"):
        found.append(
            Violation(
                oid, "spec.template.spec.restartPolicy", f"a Job's pods restart Never or OnFailure (got {policy!r})"
            )
        )
    if spec.get("podFailurePolicy") and policy != "Never":
        found.append(
            Violation(
                oid,
                "spec.template.spec.restartPolicy",
                f"spec.podFailurePolicy needs restartPolicy Never (got {policy!r})",
            )
        )
    for key, why in (
        ("backoffLimit", "how often a failed step is retried"),
        ("ttlSecondsAfterFinished", "finished Jobs and their pods are deleted after it"),
        (
            "activeDeadlineSeconds",
            "a hung step, e.g. a stuck NCCL or vLLM process, would hold its node (and GPUs) forever",
        ),
    ):
        if not isinstance(spec.get(key), int):
            found.append(Violation(oid, f"spec.{key}", f"missing: set it explicitly ({why})"))
    return found


def _check_pytorchjob(job: dict) -> list[Violation]:
    oid, spec = object_id(job), job.get("spec") or {}
    found = []
    run_policy = spec.get("runPolicy") or {}
    for key in ("backoffLimit", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        if not isinstance(run_policy.get(key), int):
            found.append(Violation(oid, f"spec.runPolicy.{key}", "missing: set it explicitly"))
    for replica, replica_spec in (spec.get("pytorchReplicaSpecs") or {}).items():
        path = f"spec.pytorchReplicaSpecs.{replica}"
        policy = (replica_spec or {}).get("restartPolicy")
        if policy not in ("OnFailure", "Never", "ExitCode"):
            found.append(
                Violation(
                    oid,
                    f"{path}.restartPolicy",
                    f"must be OnFailure, Never or ExitCode (got {policy!r}); Always never ends",
                )
            )
        containers = (((replica_spec or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            found.append(
                Violation(
                    oid, f"{path}.template.spec.containers", "the training operator needs a container named 'pytorch'"
                )
            )
    return found


def _check_trainjob(job: dict) -> list[Violation]:
    oid, spec = object_id(job), job.get("spec") or {}
    found = []
    if not isinstance(spec.get("activeDeadlineSeconds"), int):
        found.append(Violation(oid, "spec.activeDeadlineSeconds", "missing: set it explicitly"))
    if not ((spec.get("runtimeRef") or {}).get("name")):
        found.append(Violation(oid, "spec.runtimeRef.name", "missing: name the runtime, e.g. torch-distributed"))
    if not node_pod_patches(spec, TRAINER_CONTAINER):
        found.append(
            Violation(
                oid,
                "spec.runtimePatches",
                f"no patch for the {TRAINER_CONTAINER!r} job: its pod would get no volumes, "
                "security context or tolerations",
            )
        )
    return found


def _check_pod(pod: PodTemplate, available: dict[str, set[str]]) -> list[Violation]:
    oid = object_id(pod.owner)
    spec = pod.spec
    found = []
    pod_security = spec.get("securityContext") or {}
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}

    if spec.get("automountServiceAccountToken") is not False and spec.get("serviceAccountName") not in available.get(
        "ServiceAccountWithoutToken", set()
    ):
        found.append(
            Violation(
                oid, f"{pod.path}.automountServiceAccountToken", "must be false: no step talks to the Kubernetes API"
            )
        )
    account = spec.get("serviceAccountName")
    if account and account not in available.get("ServiceAccount", set()):
        found.append(
            Violation(
                oid,
                f"{pod.path}.serviceAccountName",
                f"ServiceAccount {account!r} is neither in this build nor provided (k8s/base)",
            )
        )
    if any("persistentVolumeClaim" in v for v in volumes.values()) and pod_security.get("fsGroup") is None:
        found.append(
            Violation(
                oid,
                f"{pod.path}.securityContext.fsGroup",
                "a pod that mounts a PersistentVolumeClaim sets fsGroup: a fresh volume is often "
                "owned by root and the non-root user could not write to it",
            )
        )
    for name, volume in volumes.items():
        if not DNS_LABEL.match(name or ""):
            found.append(Violation(oid, f"{pod.path}.volumes[{name}].name", f"{name!r} is not a DNS-1123 label"))
        found += _check_volume_refs(oid, f"{pod.path}.volumes[{name}]", volume, available)
    for index, ref in enumerate(spec.get("imagePullSecrets") or []):
        found += _secret_ref(oid, f"{pod.path}.imagePullSecrets[{index}].name", ref.get("name"), available)

    uses_gpu = False
    for path, container in _containers(pod):
        name = container.get("name") or ""
        if not DNS_LABEL.match(name):
            found.append(Violation(oid, f"{path}.name", f"{name!r} is not a DNS-1123 label"))
        found += _check_image(oid, path, container.get("image"))
        found_resources, gpu = _check_resources(oid, path, container.get("resources") or {})
        found += found_resources
        uses_gpu = uses_gpu or gpu
        found += _check_security(oid, path, container, pod_security, pod.owner, volumes)
        found += _check_env_refs(oid, path, container, available)
        for port in container.get("ports") or []:
            if "name" in port and (not PORT_NAME.match(port["name"]) or len(port["name"]) > 15):
                found.append(
                    Violation(
                        oid,
                        f"{path}.ports[{port['name']}].name",
                        "a port name has at most 15 lower-case letters, digits and '-'",
                    )
                )
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") not in volumes:
                found.append(
                    Violation(
                        oid,
                        f"{path}.volumeMounts[{mount.get('name')}]",
                        f"no volume named {mount.get('name')!r} in {pod.path}.volumes",
                    )
                )

    if uses_gpu and not _has_memory_shm(spec, volumes):
        found.append(
            Violation(
                oid,
                f"{pod.path}.volumes",
                "a GPU pod mounts an emptyDir with medium: Memory at /dev/shm "
                "(NCCL and vLLM need more than the 64 MB default)",
            )
        )
    return found


def _check_image(oid: str, path: str, image: str | None) -> list[Violation]:
    if not image:
        return [Violation(oid, f"{path}.image", "missing")]
    if "@sha256:" in image:
        return []
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return [Violation(oid, f"{path}.image", f"{image!r} has no tag (it means 'latest'): pin a version")]
    if last.rsplit(":", 1)[1] == "latest":
        return [Violation(oid, f"{path}.image", f"{image!r}: 'latest' is not a version; pin one")]
    return []


def _check_resources(oid: str, path: str, resources: dict) -> tuple[list[Violation], bool]:
    found = []
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for key in ("cpu", "memory"):
        if key not in requests:
            found.append(Violation(oid, f"{path}.resources.requests.{key}", "missing: the scheduler needs it"))
    if "memory" not in limits:
        found.append(Violation(oid, f"{path}.resources.limits.memory", "missing: an unbounded pod can starve its node"))
    uses_gpu = False
    for gpu in GPU_RESOURCES:
        if gpu in requests or gpu in limits:
            uses_gpu = True
            request, limit = requests.get(gpu), limits.get(gpu)
            if str(request) != str(limit):
                found.append(
                    Violation(
                        oid,
                        f"{path}.resources.limits.{gpu}",
                        f"GPU limit must equal the request (request {request!r}, limit {limit!r})",
                    )
                )
    return found, uses_gpu


def _check_security(
    oid: str, path: str, container: dict, pod_security: dict, owner: dict, volumes: dict[str, dict]
) -> list[Violation]:
    found = []
    security = container.get("securityContext") or {}
    non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    if non_root is not True:
        found.append(
            Violation(
                oid, f"{path}.securityContext.runAsNonRoot", "must be true (here or in the pod's securityContext)"
            )
        )
    if user == 0:
        found.append(Violation(oid, f"{path}.securityContext.runAsUser", "must not be 0 (root)"))
    if security.get("allowPrivilegeEscalation") is not False:
        found.append(Violation(oid, f"{path}.securityContext.allowPrivilegeEscalation", "must be false"))
    if security.get("privileged"):
        found.append(Violation(oid, f"{path}.securityContext.privileged", "must not be true"))
    if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
        found.append(Violation(oid, f"{path}.securityContext.capabilities.drop", "must include ALL"))
    annotations = (owner.get("metadata") or {}).get("annotations") or {}
    if security.get("readOnlyRootFilesystem") is True:
        mounts = {m.get("mountPath"): m.get("name") for m in container.get("volumeMounts") or []}
        if "/tmp" not in mounts:
            found.append(
                Violation(
                    oid,
                    f"{path}.volumeMounts",
                    "a read-only root filesystem needs a writable volume (emptyDir) at /tmp",
                )
            )
    elif not annotations.get(WRITABLE_ROOT_ANNOTATION):
        found.append(
            Violation(
                oid,
                f"{path}.securityContext.readOnlyRootFilesystem",
                f"must be true, or annotate the {owner.get('kind')} with "
                f"{WRITABLE_ROOT_ANNOTATION}: <why the step writes to its root filesystem>",
            )
        )
    return found


def _has_memory_shm(spec: dict, volumes: dict[str, dict]) -> bool:
    for container in spec.get("containers") or []:
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPath") == "/dev/shm":
                volume = volumes.get(mount.get("name")) or {}
                if (volume.get("emptyDir") or {}).get("medium") == "Memory":
                    return True
    return False


def _secret_ref(oid: str, path: str, name: str | None, available: dict[str, set[str]]) -> list[Violation]:
    if name in available.get("Secret", set()):
        return []
    return [
        Violation(
            oid,
            path,
            f"Secret {name!r} is neither in this build nor documented (docs/kubernetes.md, section 'Secrets')",
        )
    ]


def _named_ref(oid: str, path: str, kind: str, name: str | None, available: dict[str, set[str]]) -> list[Violation]:
    if name in available.get(kind, set()):
        return []
    return [Violation(oid, path, f"{kind} {name!r} is not in this build (nor provided by k8s/base)")]


def _check_volume_refs(oid: str, path: str, volume: dict, available: dict[str, set[str]]) -> list[Violation]:
    found = []
    if "secret" in volume:
        found += _secret_ref(oid, f"{path}.secret.secretName", volume["secret"].get("secretName"), available)
    if "configMap" in volume:
        found += _named_ref(oid, f"{path}.configMap.name", "ConfigMap", volume["configMap"].get("name"), available)
    if "persistentVolumeClaim" in volume:
        found += _named_ref(
            oid,
            f"{path}.persistentVolumeClaim.claimName",
            "PersistentVolumeClaim",
            volume["persistentVolumeClaim"].get("claimName"),
            available,
        )
    for index, source in enumerate((volume.get("projected") or {}).get("sources") or []):
        if "secret" in source:
            found += _secret_ref(
                oid, f"{path}.projected.sources[{index}].secret.name", source["secret"].get("name"), available
            )
        if "configMap" in source:
            found += _named_ref(
                oid,
                f"{path}.projected.sources[{index}].configMap.name",
                "ConfigMap",
                source["configMap"].get("name"),
                available,
            )
    return found


def _check_env_refs(oid: str, path: str, container: dict, available: dict[str, set[str]]) -> list[Violation]:
    found = []
    for env in container.get("env") or []:
        source = env.get("valueFrom") or {}
        where = f"{path}.env[{env.get('name')}].valueFrom"
        if "secretKeyRef" in source:
            found += _secret_ref(oid, f"{where}.secretKeyRef.name", source["secretKeyRef"].get("name"), available)
        if "configMapKeyRef" in source:
            found += _named_ref(
                oid, f"{where}.configMapKeyRef.name", "ConfigMap", source["configMapKeyRef"].get("name"), available
            )
    for index, env_from in enumerate(container.get("envFrom") or []):
        if "secretRef" in env_from:
            found += _secret_ref(
                oid, f"{path}.envFrom[{index}].secretRef.name", env_from["secretRef"].get("name"), available
            )
        if "configMapRef" in env_from:
            found += _named_ref(
                oid,
                f"{path}.envFrom[{index}].configMapRef.name",
                "ConfigMap",
                env_from["configMapRef"].get("name"),
                available,
            )
    return found
